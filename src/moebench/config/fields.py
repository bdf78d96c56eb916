"""The strict field types, bounds and base model that every config section is built from.

YAML can surprise (`yes` is a bool, `1e3` a string in YAML 1.1), so numbers and booleans are
strict: a bool is never taken as a number, a string never as either, NaN and inf are refused.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, AllowInfNan, BaseModel, ConfigDict
from pydantic import Strict as StrictType

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""Study, dataset and strategy names become path parts and Snakemake wildcards."""


Int = Annotated[int, StrictType()]
"""An integer as written: a bool (`yes`), a float or a string is refused, not coerced."""
Float = Annotated[float, StrictType(), AllowInfNan(False)]
"""A finite number: an int is taken, a bool (`yes` -> 1.0), a string, NaN or inf is refused."""
Bool = Annotated[bool, StrictType()]
"""true or false: 1, 0 or the string "true" is refused."""

SEED_MAX = 2**31 - 2
"""Largest seed: seed + 1 (the drop seed) still fits a signed 32-bit integer."""
BIG = 1 << 20
"""Upper bound of sizes (widths, counts, tokens): far above any CPU or single-node study; a
refusal names the bound, which is a choice made here (raise it in moebench/config/)."""

TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql")
"""MLflow stores a run may log to: a sqlite file, a tracking server, a SQL database. MLflow's
own file store (a bare path) is deprecated and refused by MLflow 3."""


def _tracking_uri(uri: str) -> str:
    """Refuse an empty URI (MLflow would write mlflow.db into the working directory) and any
    scheme but TRACKING_SCHEMES, before any work."""
    scheme, sep, rest = uri.partition("://")
    if not (sep and rest.strip("/") and scheme.split("+")[0] in TRACKING_SCHEMES):
        raise ValueError(
            "not a supported MLflow store; allowed: sqlite:///<file>, http(s)://<server>, "
            "postgresql://, mysql://, mssql:// database URIs, or null (MLflow off)"
        )
    return uri


TrackingUri = Annotated[str, AfterValidator(_tracking_uri)]
"""The URI of an MLflow store (TRACKING_SCHEMES); an empty string is refused."""


class Strict(BaseModel):
    """Base: unknown keys are errors, assignment is validated, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
