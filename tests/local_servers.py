"""Servers of the tests on 127.0.0.1: a free TCP port, and a real `mlflow server` over a
sqlite store (one home for both, used by the end-to-end and the fault tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(db: Path, artifacts: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `mlflow server` over the sqlite store `db`, new experiments' artifacts under
    `artifacts`: its URI and process, in a process group of its own that `stop_server` ends."""
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", f"sqlite:///{db}",
         "--default-artifact-root", str(artifacts), "--workers", "1"],
        cwd=db.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # no background job runner: it holds up the first requests for tens of seconds
        env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        start_new_session=True,  # its workers are child processes
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        else:
            raise TimeoutError(f"mlflow server did not answer at {uri}/health in 2 minutes")
        yield uri, proc
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Kill the server and its workers (its process group), once."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
