"""Test-wide settings and fixtures: one torch thread (bitwise reproducible CPU math), Triton
in interpreter mode (kernels run on CPU tensors), no network for Hugging Face libraries, the
real one-node SLURM cluster shared by every `slurm` test, and the two-node one (network
namespaces) of the multi-node tests, and headless Chromium for the browser checks."""

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import torch  # imported after TRITON_INTERPRET is set

torch.set_num_threads(1)


CLUSTER = Path(__file__).parent / "slurm" / "local-cluster.sh"
TWO_NODES = Path(__file__).parent / "slurm" / "two-node-cluster.sh"
TWO_NODE_CONF = "/var/tmp/moebench-slurm2/etc/slurm.conf"


def slurm_cluster_up() -> bool:
    """The controller answers and the node is in service (idle, or busy with other jobs)."""
    if shutil.which("sinfo") is None:
        return False
    res = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, check=False)
    return res.returncode == 0 and bool({"idle", "mix", "alloc"} & set(res.stdout.split()))


_started_here: list[bool] = []
"""Set once this session starts the cluster; it is stopped when the session ends."""


def _start_cluster() -> None:
    res = subprocess.run(
        ["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=600, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    _started_here.append(True)


@pytest.fixture(scope="session", autouse=True)
def slurm_controller_up_while_installed() -> Iterator[None]:
    """Where a SLURM client is installed but its controller is down, every Snakemake call
    waits 10 s for the SLURM plugin's `scontrol show config` to time out; so the session
    keeps the test cluster up from the start (and stops it at the end if it started it)."""
    if shutil.which("scontrol") and os.geteuid() == 0 and not slurm_cluster_up():
        _start_cluster()
    yield
    if _started_here:
        subprocess.run(["bash", str(CLUSTER), "stop"], check=False, timeout=60)


@pytest.fixture(scope="session")
def slurm_cluster(slurm_controller_up_while_installed: None) -> None:
    """The real one-node cluster of tests/slurm/local-cluster.sh (root: apt-get, /etc/slurm,
    daemons), started (installed if needed) once per session if it is not up."""
    if os.geteuid() != 0:
        pytest.skip("the one-node SLURM cluster needs root (apt-get, /etc/slurm, daemons)")
    if not slurm_cluster_up():
        _start_cluster()


@pytest.fixture(scope="session")
def two_node_cluster(slurm_controller_up_while_installed: None) -> Iterator[dict[str, str]]:
    """The real two-node cluster of tests/slurm/two-node-cluster.sh (root: network
    namespaces, daemons): the environment that points SLURM clients at it. Started for the
    session and torn down at its end (namespaces, links, files), unless it was up before."""
    if os.geteuid() != 0:
        pytest.skip("the two-node SLURM cluster needs root (network namespaces, daemons)")
    env = os.environ | {"SLURM_CONF": TWO_NODE_CONF}
    started = True
    if Path(TWO_NODE_CONF).exists():  # (without it, sinfo looks for a config for a minute)
        res = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                             env=env, check=False)
        started = res.returncode != 0 or res.stdout.split() != ["idle"]
    if started:
        res = subprocess.run(["bash", str(TWO_NODES), "start"], capture_output=True, text=True,
                             timeout=600, check=False)
        if res.returncode != 0:
            subprocess.run(["bash", str(TWO_NODES), "stop"], check=False, timeout=60)
            pytest.fail(f"the two-node SLURM cluster did not start:\n{res.stderr}")
    yield env
    if started:
        subprocess.run(["bash", str(TWO_NODES), "stop"], check=False, timeout=60)


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


@pytest.fixture
def chromium() -> Iterator[Browser]:
    """Debian's headless Chromium (installed with apt-get if absent), driven by Playwright; per
    test, because Playwright's event loop, while it runs, breaks Snakemake's API in-process."""
    if not Path(CHROMIUM).exists():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("Chromium is absent and installing it needs root with apt-get")
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900,
                                 check=False)
            assert res.returncode == 0, res.stdout + res.stderr
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()
