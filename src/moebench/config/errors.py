"""Error messages of config validation: one line per problem naming the field, the value
(shortened, `shown`) and what is allowed; a typo'd key gets the allowed keys and a guess."""

from __future__ import annotations

import difflib
import reprlib
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 60
_SHOWN.maxlist = _SHOWN.maxdict = 4
_SHOWN.maxlevel = 1


def shown(value: Any) -> str:
    """A short repr of a user's value for a message: bounded in length and time (a YAML alias
    bomb is never walked in full)."""
    return _SHOWN.repr(value)



def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _unwrap(tp: Any) -> Any:
    """`Annotated[X, ...]` -> X; `M | None` -> the pydantic model M of a union (else None)."""
    while get_origin(tp) in (Union, types.UnionType, Annotated):
        args = get_args(tp)
        tp = args[0] if get_origin(tp) is Annotated else next(filter(_is_model, args), None)
    return tp


def _model_at(model: Any, path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model reached from `model` along a validation-error location (dict keys
    are stepped over); None if the path leaves the models."""
    model = _unwrap(model)
    for part in path:
        if _is_model(model):
            field = model.model_fields.get(str(part))
            model = field.annotation if field is not None else None
        elif get_origin(model) is dict:
            model = get_args(model)[1]
        else:
            return None
        model = _unwrap(model)
    return model if _is_model(model) else None


def _unknown_key_hint(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """"; allowed keys: ...; did you mean ...?" for an unknown key at `loc` (a typo)."""
    parent = _model_at(model, loc[:-1])
    if parent is None:
        return ""
    allowed = list(parent.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    guess = f"; did you mean {close[0]!r}?" if close else ""
    return f"; allowed keys: {', '.join(allowed)}{guess}"


def describe_errors(err: ValidationError, model: type[BaseModel]) -> list[str]:
    """`field: reason (got value)` per problem of validating `model`; cross-field (model-level)
    problems give their own message, which names the fields; unknown keys list the allowed."""
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        got = "" if not loc or isinstance(value, dict) else f" (got {shown(value)})"
        hint = _unknown_key_hint(model, e["loc"]) if e["type"] == "extra_forbidden" else ""
        if e["type"] == "less_than_equal" and e.get("ctx", {}).get("le", 0) > 1:
            hint = "; the bound is a choice of moebench/config, raise it there if needed"
        named = not loc or msg.startswith(loc)  # a validator's message names field and value
        out.append(msg if named else f"{loc}: {msg}{got}{hint}")
    return out


def format_validation_error(err: ValidationError, model: type[BaseModel], where: str) -> str:
    """"invalid <where>:" and one indented line per problem of validating `model`."""
    return "\n".join([f"invalid {where}:", *(f"  {p}" for p in describe_errors(err, model))])
