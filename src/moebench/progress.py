"""Progress of long work (training, data, replay, aggregation), one home: a tqdm bar with
rate and ETA when stderr is a terminal; otherwise (batch jobs, the workflow's logs) a log
line at most every LOG_EVERY_S seconds, none at all for work that ends sooner."""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

logger = logging.getLogger(__name__)

LOG_EVERY_S = 60.0
"""Seconds between two progress lines in a log (and before the first one)."""


def on_terminal() -> bool:
    """Whether progress is drawn as a bar: stderr is a terminal."""
    return sys.stderr.isatty()


def eta(seconds: float, done: int, left: int) -> str:
    """Time left as h:mm:ss at the pace so far (`done` units of work in `seconds`)."""
    return str(datetime.timedelta(seconds=round(seconds / max(done, 1) * left)))


class _LogLines(tqdm):
    """tqdm drawn as INFO lines (`desc:  40% 4/10 [01:00<01:30, 15.00s/layer]`) at most every
    LOG_EVERY_S seconds, the first after LOG_EVERY_S, and a last one if any was written."""

    monitor_interval = 0  # no monitor thread: it would force lines between the intervals

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, file=io.StringIO(), ncols=0, delay=LOG_EVERY_S,
                         mininterval=LOG_EVERY_S, maxinterval=LOG_EVERY_S, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        logger.info(str(self))
        return True


@contextlib.contextmanager
def progress(
    desc: str,
    unit: str,
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    initial: int = 0,
    show: bool = True,
    lines: bool = True,
) -> Iterator[tqdm]:
    """A bar over `iterable` (or `total` units, advanced by `.update(n)`): drawn on a terminal
    (moebench's log lines print above it), logged now and then otherwise (`lines`), silent
    where not `show` (e.g. every rank but the first)."""
    if show and on_terminal():
        bar = tqdm(iterable, desc=desc, unit=unit, total=total, initial=initial,
                   dynamic_ncols=True)
        with bar, logging_redirect_tqdm([logging.getLogger("moebench")]):
            yield bar
    else:
        with _LogLines(iterable, desc=desc, unit=unit, total=total, initial=initial,
                       disable=not (show and lines)) as bar:
            yield bar
