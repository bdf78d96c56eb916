"""Atomic file output: every file is written to a temporary sibling and renamed into place,
so a reader (or a kill -9) never sees a half-written file."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from filelock import FileLock, Timeout


def check_writable_dir(path: str | Path, name: str) -> None:
    """ValueError unless `path` is a writable directory or can be created as one.

    Creates nothing (it checks the nearest existing ancestor), so a command can refuse an
    unusable output directory before any work and leave no trace; `name` is the option or
    field the path came from."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}={str(path)!r} exists and is not a directory")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name}={str(path)!r} cannot be created: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name}={str(path)!r} is not writable (no permission on {existing})")


LOCK_NAME = ".moebench.lock"


@contextlib.contextmanager
def writer_lock(folder: Path, name: str) -> Iterator[None]:
    """Hold `folder/.moebench.lock` while writing `folder` (created here): a second writer
    into the same folder is refused with a ValueError naming `name` instead of mixing its
    files with ours. The lock file is removed when the hold ends."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ValueError(
            f"{name}={str(folder)!r} is being written by another process (it holds "
            f"{folder / LOCK_NAME}); allowed: one writer per directory: wait for it to end or "
            "pick another directory"
        ) from None
    try:
        yield
    finally:
        (folder / LOCK_NAME).unlink(missing_ok=True)
        lock.release()


def remove_temporaries(folder: str | Path, names: Iterable[str]) -> None:
    """Delete the temporary files `atomic_path` left beside `folder/<name>` when a process was
    killed before its rename (`.<name>.*.tmp`). A live writer holds a lock on its temporary,
    so only a dead writer's file is deleted, never a concurrent writer's."""
    for name in names:
        for stale in Path(folder).glob(f".{name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError), stale.open("rb") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its writer is alive
                stale.unlink(missing_ok=True)


class DiskFullError(OSError):
    """The device holding an output is full (or over quota): nothing was replaced."""


@contextlib.contextmanager
def disk_full_message(path: Path, state: str | None = None) -> Iterator[None]:
    """ENOSPC/EDQUOT while writing `path` -> a DiskFullError that says what and where and
    `state` (what is left; default: the previous file, unchanged, as `atomic_path` leaves
    it), also when a writer turned it into another error, as torch.save's zip writer does."""
    try:
        yield
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None and not (
            isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
        ):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise DiskFullError(
            errno.ENOSPC, f"no space left on the device of {path.parent} while writing "
            f"{path.name}; {state or f'the previous {path.name}, if any, is unchanged'}: "
            "free space and rerun"
        ) from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the body succeeds.

    The temporary is created as `.<name>.*.new`, locked, then renamed to `.<name>.*.tmp`: the
    lock, held until the rename onto `path`, tells `remove_temporaries` the writer is alive.
    A full disk is a DiskFullError naming the file."""
    path = Path(path)
    with disk_full_message(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, new = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
        tmp_path = Path(new).with_suffix(".tmp")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            Path(new).replace(tmp_path)
            yield tmp_path
            with tmp_path.open("rb+") as f:
                os.fsync(f.fileno())
            tmp_path.chmod(0o644)  # mkstemp creates 0600; results are meant to be shared
            tmp_path.replace(path)
        finally:
            Path(new).unlink(missing_ok=True)
            tmp_path.unlink(missing_ok=True)
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file for writing; it replaces `path` when the block exits cleanly."""
    with atomic_path(path) as tmp, tmp.open(mode) as f:
        yield f


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys) so that identical runs give identical bytes."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (metrics.jsonl, timing.jsonl), blank lines skipped."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_yaml(path: str | Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=True))


def write_parquet(path: str | Path, table: pa.Table) -> None:
    """Parquet without wall-clock metadata, so equal tables give equal bytes."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=False)
