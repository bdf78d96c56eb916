"""Distributed training (moebench.train.distributed): 4 gloo processes standing for 2 nodes x 2
GPUs train the same global batch as one process (losses within float tolerance, identical
loads and routing, the same bias on every rank), with either dispatcher (per_expert, dedup)
and the padded, sync-free per_expert all-to-all (which drops nothing at a2a cf = W),
the measured all-to-all equals the accounting's prediction, a killed run resumes under
torchrun to the same bytes, and srun on the real one-node SLURM cluster gives the same
summary. Plus the launcher environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp

from local_servers import free_port
from moebench.config import DataConfig, RunConfig
from moebench.data import prepare as prepare_data
from moebench.train import TIMING_KEYS, Trainer, prepare, train
from moebench.train.checkpoint import CKPT_NAME
from moebench.train.distributed import ProcessLaunch, check_world, first_host, process_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORLD = 4
DATA = DataConfig(source="synthetic", vocab_size=512, synthetic_docs=200, synthetic_doc_tokens=64)


def tiny_cfg(data_dir: Path, **train: Any) -> RunConfig:
    """16 experts top-4 on 2 nodes x 2 GPUs; sigmoid router with the aux-loss-free bias and
    the batch-wide (switch, global) and sequence-wise losses, gradient accumulation 2."""
    return RunConfig.model_validate({
        "data_dir": str(data_dir), "data": DATA.model_dump(),
        "model": {"d_model": 32, "n_layers": 3, "n_heads": 2, "n_dense_layers": 1,
                  "dense_hidden": 64, "expert_hidden": 16},
        "router": {"num_experts": 16, "top_k": 4, "score_fn": "sigmoid", "normalize": True},
        "topology": {"num_nodes": 2, "gpus_per_node": 2},
        "balance": {"bias": {"enabled": True}, "seq_alpha": 1e-3, "global_alpha": 1e-2,
                    "switch_alpha": 1e-2, "aux_counts": "actual"},
        "train": {"steps": 8, "batch_size": 4, "grad_accum": 2, "seq_len": 32,
                  "warmup_steps": 2, "eval_every": 4, "eval_batches": 2, "log_every": 1,
                  "ckpt_every": 2, "trace_tokens": 100, **train},
    })


def rank_env(rank: int, port: int) -> dict[str, str]:
    """What torchrun gives each worker."""
    return {"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def summary_without_timing(out: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads((out / "summary.json").read_text()).items()
            if k not in TIMING_KEYS}


# ---- the launcher environment (fast) -------------------------------------------------------
def test_first_host_of_slurm_node_lists() -> None:
    assert first_host("vm") == "vm"
    assert first_host("gpu[03-05,9],cpu1") == "gpu03"
    assert first_host("n[7]-ib,m1") == "n7-ib"
    with pytest.raises(ValueError, match="node list"):
        first_host("")


def test_launch_from_torchrun_srun_and_plain_environments() -> None:
    assert ProcessLaunch.from_env({}) == ProcessLaunch()
    assert ProcessLaunch.from_env(rank_env(2, 1234)) == ProcessLaunch(2, 4, 2, "torchrun")
    step = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4",
            "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "node[02-03]",
            "SLURM_JOB_ID": "41"}
    assert ProcessLaunch.from_env(step) == ProcessLaunch(3, 4, 1, "slurm", "node02", 10041)
    assert ProcessLaunch.from_env(step | {"MASTER_ADDR": "h", "MASTER_PORT": "5"}).master_port == 5
    # a batch script (no job step) and `srun -n 1` are one process, whatever the job's tasks
    batch = {k: v for k, v in step.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")}
    assert ProcessLaunch.from_env(batch) == ProcessLaunch()
    assert ProcessLaunch.from_env(step | {"SLURM_STEP_NUM_TASKS": "1"}) == ProcessLaunch()
    with pytest.raises(ValueError, match="SLURM_PROCID='x'"):
        ProcessLaunch.from_env(step | {"SLURM_PROCID": "x"})
    with pytest.raises(ValueError, match="rank=4"):
        ProcessLaunch.from_env(rank_env(4, 1))


def test_world_size_must_divide_the_experts_and_split_the_batch(tmp_path: Path) -> None:
    """The modelled topology (4 devices) is independent of the world size: any divisor of
    the 16 experts that splits the batch runs."""
    cfg = tiny_cfg(tmp_path)
    for world in (1, 2, 4):
        check_world(cfg, world)
    with pytest.raises(ValueError, match=r"started 3 processes; allowed: a divisor of "
                                         r"router\.num_experts=16 \(\[1, 2, 4, 8, 16\]\)"):
        check_world(cfg, 3)
    with pytest.raises(ValueError, match=r"train\.batch_size=6 .* multiple of 4"):
        check_world(tiny_cfg(tmp_path, batch_size=6), 4)


# ---- 4 gloo processes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist_data")
    prepare_data(DATA, out, seed=0)
    return out


def _worker(rank: int, port: int, cfg_json: str, folder: str) -> None:
    """One rank: train, then save its bias (the run files are rank 0's)."""
    os.environ.update(rank_env(rank, port))
    torch.set_num_threads(1)
    cfg = RunConfig.model_validate_json(cfg_json)
    folder_path = Path(folder)
    with process_group(cfg, ProcessLaunch.from_env(), torch.device("cpu")) as par:
        trainer = Trainer(prepare(cfg, folder_path / "run", folder_path / "ckpt", par))
        trainer.run()
        assert trainer.bias is not None
        torch.save(trainer.bias.bias_LE, folder_path / f"bias{rank}.pt")


def spawn_run(cfg: RunConfig, folder: Path) -> Path:
    """`cfg` trained on 4 gloo ranks (torch.multiprocessing, torchrun's environment)."""
    mp.spawn(_worker, args=(free_port(), cfg.model_dump_json(), str(folder)), nprocs=WORLD)
    return folder


@pytest.fixture(scope="module")
def dist_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run on 4 gloo ranks."""
    return spawn_run(tiny_cfg(data_dir), tmp_path_factory.mktemp("dist_run"))


@pytest.fixture(scope="module")
def dedup_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run on 4 gloo ranks with the deduplicated dispatcher."""
    cfg = tiny_cfg(data_dir)
    topology = cfg.topology.model_copy(update={"dispatcher": "dedup"})
    return spawn_run(cfg.model_copy(update={"topology": topology}),
                     tmp_path_factory.mktemp("dedup_run"))


@pytest.fixture(scope="module")
def padded_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run on 4 gloo ranks with the padded all-to-all at a capacity factor of W."""
    cfg = tiny_cfg(data_dir)
    topology = cfg.topology.model_copy(update={"a2a_capacity_factor": float(WORLD)})
    return spawn_run(cfg.model_copy(update={"topology": topology}),
                     tmp_path_factory.mktemp("padded_run"))


DISPATCHER_RUNS = pytest.mark.parametrize("run", ["dist_run", "dedup_run", "padded_run"])


@pytest.fixture(scope="module")
def single_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run in one process: its run directory (and its last checkpoint in ckpt/)."""
    folder = tmp_path_factory.mktemp("single_run")
    train(tiny_cfg(data_dir), folder / "run", folder / "ckpt")
    return folder


def assert_same_training(single: Path, dist: Path, world: int) -> None:
    """Run directory `dist` (`world` ranks) trained what the one-process run `single` did:
    the same records, identical routing and loads, losses within float tolerance."""
    a, b = lines(single / "metrics.jsonl"), lines(dist / "metrics.jsonl")
    for record in b:  # the padded all-to-all's drops: none at a capacity factor of W
        assert record.pop("a2a_drop_frac", 0.0) == 0.0
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    close = {"loss", "ce_loss", "grad_norm", "aux", "val_loss", "val_ppl", "val_bpb"}
    for one, many in zip(a, b, strict=True):
        assert one.keys() == many.keys()
        for key, value in one.items():
            # routing decisions: identical per-expert loads every step (so MaxVio, drops)
            approx = key in close and value is not None
            expect = pytest.approx(many[key], rel=1e-5) if approx else many[key]
            assert value == expect, (one["kind"], one["step"], key)
    trace_1, trace_w = (pq.read_table(d / "routing_trace.parquet") for d in (single, dist))
    assert trace_1.schema.metadata == trace_w.schema.metadata
    for column in ("layer", "token", "slot", "expert"):
        assert trace_1[column].equals(trace_w[column])
    weights_1, weights_w = (torch.tensor(t["weight"].to_numpy()) for t in (trace_1, trace_w))
    torch.testing.assert_close(weights_1, weights_w, rtol=1e-5, atol=1e-6)
    s1, sw = summary_without_timing(single), summary_without_timing(dist)
    assert (s1.pop("world_size"), sw.pop("world_size")) == (1, world)
    assert s1.keys() == sw.keys()
    for key, value in s1.items():
        close = isinstance(value, float) or key == "maxvio_global_layers"
        assert value == (pytest.approx(sw[key], rel=1e-5) if close else sw[key]), key


@pytest.mark.distributed
@pytest.mark.slow
@DISPATCHER_RUNS
def test_four_ranks_match_one_process_on_the_same_global_batch(
    single_run: Path, run: str, request: pytest.FixtureRequest
) -> None:
    dist_run = request.getfixturevalue(run)
    assert_same_training(single_run / "run", dist_run / "run", WORLD)
    padded = [("a2a_drop_frac" in r) for r in lines(dist_run / "run" / "metrics.jsonl")
              if r["kind"] == "train"]
    assert all(padded) if run == "padded_run" else not any(padded)
    assert sorted(lines(single_run / "run" / "metrics.jsonl")[0]["aux"]) == [
        "global", "seq", "switch"]
    # one bias update per step from the global loads: the same on every rank and as in one
    # process (the single run's last checkpoint holds its bias)
    bias_1 = torch.load(single_run / "ckpt" / CKPT_NAME, weights_only=True)["bias"]["bias_LE"]
    assert bias_1.abs().sum() > 0
    for rank in range(WORLD):
        assert torch.equal(torch.load(dist_run / f"bias{rank}.pt"), bias_1)


@pytest.mark.distributed
@pytest.mark.slow
@DISPATCHER_RUNS
def test_measured_all_to_all_equals_the_accounting(run: str, request: pytest.FixtureRequest
                                                   ) -> None:
    dist_run = request.getfixturevalue(run)
    timing = lines(dist_run / "run" / "timing.jsonl")
    assert [r["step"] for r in timing] == list(range(1, 9))
    for record in timing:
        a2a = record["a2a"]
        measured, predicted = a2a["measured"], a2a["predicted"]
        assert measured["bytes"] == predicted["bytes"]
        moved = [measured[key][p][link] for key in ("bytes", "moved_bytes")
                 for p in ("dispatch", "combine") for link in ("nvlink", "ib")]
        if run == "padded_run":  # C = T K rows to each other rank: more than the useful
            assert all(m > b for b, m in zip(moved[:4], moved[4:], strict=True))
        else:
            assert moved[:4] == moved[4:]
        assert measured["copies"] == predicted["copies"]
        assert min(measured["bytes"]["dispatch"].values()) > 0  # NVLink and IB both used
        assert a2a["elem_bytes"] == {"dispatch": 4, "combine": 4}  # float32 on CPU
        assert set(measured["seconds"]) == {"permute", "counts", "dispatch", "experts",
                                            "combine", "unpermute"}
        assert predicted["modeled_us"]["dispatch"] > 0


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.mark.distributed
@pytest.mark.slow
def test_killed_distributed_run_resumes_under_torchrun_to_the_same_files(
    data_dir: Path, dist_run: Path, tmp_path: Path
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(tiny_cfg(data_dir).model_dump_json())  # JSON is YAML
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    args = ["train", "--config", str(config), "--out", str(out), "--ckpt-dir", str(ckpt)]
    port = free_port()
    procs = [subprocess.Popen([str(BIN / "moebench"), *args], env=os.environ | rank_env(r, port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for r in range(WORLD)]
    try:
        deadline = time.monotonic() + 300
        while (not (ckpt / CKPT_NAME).exists() and time.monotonic() < deadline
               and all(p.poll() is None for p in procs)):
            time.sleep(0.005)
        for p in procs:
            p.send_signal(signal.SIGKILL)
    finally:
        _stop(procs)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * WORLD, "ended before the kill"
    assert not (out / "summary.json").exists()
    killed_at = torch.load(ckpt / CKPT_NAME, weights_only=True)["step"]
    assert 2 <= killed_at < 8

    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}",
         "--master-addr=127.0.0.1", f"--master-port={free_port()}", "--no-python",
         str(BIN / "moebench"), *args],
        capture_output=True, text=True, timeout=400, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from step {killed_at}" in res.stderr
    straight = dist_run / "run"
    for name in ("metrics.jsonl", "routing_trace.parquet"):
        assert (out / name).read_bytes() == (straight / name).read_bytes(), name
    assert summary_without_timing(out) == summary_without_timing(straight)
    assert [r["step"] for r in lines(out / "timing.jsonl")] == list(range(1, 9))


# ---- srun on the one-node SLURM cluster ----------------------------------------------------
@pytest.mark.slurm
@pytest.mark.distributed
@pytest.mark.slow
def test_srun_with_four_tasks_gives_the_same_summary(
    slurm_cluster: None, data_dir: Path, dist_run: Path, tmp_path: Path
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(tiny_cfg(data_dir).model_dump_json())
    out = tmp_path / "run"
    # --overcommit: 4 tasks on the test node's 2 CPUs
    res = subprocess.run(
        ["srun", f"--ntasks={WORLD}", "--overcommit", "--kill-on-bad-exit=1", "--time=10",
         str(BIN / "moebench"), "train", "--config", str(config), "--out", str(out),
         "--ckpt-dir", str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("done: val_loss") == 1  # rank 0 alone reports
    straight = dist_run / "run"
    assert summary_without_timing(out) == summary_without_timing(straight)
    assert (out / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()


# ---- srun across two SLURM nodes (network namespaces) --------------------------------------
PROBE = REPO / "tests" / "slurm" / "link_probe.py"
NODE1 = "moebench-node1"  # node1's network namespace (tests/slurm/two-node-cluster.sh)
HEADER_BYTES = 66  # per packet on the link: Ethernet 14 + IPv4 20 + TCP 32 (timestamps)


def link_counters() -> tuple[int, int]:
    """(bytes, packets) on the link between the two test nodes so far, both directions."""
    stats = [f"/sys/class/net/ib0/statistics/{d}_{n}" for n in ("bytes", "packets")
             for d in ("rx", "tx")]
    res = subprocess.run(["ip", "netns", "exec", NODE1, "cat", *stats], capture_output=True,
                         text=True, check=True)
    rx_bytes, tx_bytes, rx_packets, tx_packets = map(int, res.stdout.split())
    return rx_bytes + tx_bytes, rx_packets + tx_packets


def srun_two_nodes(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    """`command` as 4 tasks, 2 on node1 (ranks 0, 1) and 2 on node2 (ranks 2, 3)."""
    return subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=2", "--kill-on-bad-exit=1",
                           "--time=10", *command], env=env, capture_output=True, text=True,
                          timeout=600, check=False)


def node_limited(cfg: RunConfig) -> RunConfig:
    """`cfg` with node-limited routing: each token's experts on M = 1 of the 2 nodes."""
    router = cfg.router.model_dump() | {"limit": "node", "group_limit": 1}
    return RunConfig.model_validate(cfg.model_dump() | {"router": router})


@pytest.mark.slurm
@pytest.mark.distributed
@pytest.mark.slow
def test_srun_across_two_nodes_trains_the_one_process_run(
    two_node_cluster: dict[str, str], data_dir: Path, single_run: Path, dist_run: Path,
    tmp_path: Path
) -> None:
    """Ranks 0, 1 on node1 and 2, 3 on node2 (their own network namespaces), rendezvous at
    MASTER_ADDR=node1, gloo over the link between them."""
    config = tmp_path / "run.yaml"
    config.write_text(tiny_cfg(data_dir).model_dump_json())
    out = tmp_path / "run"
    before = link_counters()
    res = srun_two_nodes(two_node_cluster, str(BIN / "moebench"), "train", "--config",
                         str(config), "--out", str(out), "--ckpt-dir", str(tmp_path / "ckpt"))
    assert res.returncode == 0, res.stderr[-3000:]
    crossed = link_counters()[0] - before[0]
    assert_same_training(single_run / "run", out, WORLD)
    # bitwise the 4 ranks of one host: the same collectives, whatever the network
    assert (out / "metrics.jsonl").read_bytes() == (dist_run / "run" / "metrics.jsonl").read_bytes()
    # the link carried at least the forward all-to-all's accounted inter-node bytes (the
    # backward's, the all-reduces and the checkpoints' gathers cross it too)
    accounted = sum(r["a2a"]["measured"]["bytes"][phase]["ib"]
                    for r in lines(out / "timing.jsonl") for phase in ("dispatch", "combine"))
    print(f"two-node training run: {crossed} bytes crossed the link; forward all-to-all "
          f"accounted across nodes: {accounted} bytes")
    assert crossed > accounted > 0


@pytest.mark.slurm
@pytest.mark.distributed
@pytest.mark.slow
def test_link_between_the_nodes_carries_the_accounted_all_to_all(
    two_node_cluster: dict[str, str], data_dir: Path, tmp_path: Path
) -> None:
    """One forward pass of the tiny model on the two nodes (tests/slurm/link_probe.py), with
    unrestricted and node-limited routing: the link's bytes, less 66 header bytes per packet,
    are the all-to-all's accounted inter-node bytes plus gloo's framing, the exchange of the
    split sizes and the forward's small all-reduces. Node-limited routing cuts the nodes per
    token, which only a deduplicating dispatcher turns into fewer bytes: moebench's real
    all-to-all sends one copy per (token, expert), so the link carries what that accounting
    says in both runs, not less."""
    cfgs = {"free": tiny_cfg(data_dir), "node": node_limited(tiny_cfg(data_dir))}
    for name, cfg in cfgs.items():
        (tmp_path / f"{name}.yaml").write_text(cfg.model_dump_json())
    out = tmp_path / "probe.json"
    res = srun_two_nodes(two_node_cluster, sys.executable, str(PROBE),
                         *(str(tmp_path / f"{name}.yaml") for name in cfgs), "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    probe = json.loads(out.read_text())
    for name, p in probe.items():
        assert p["hosts"] == ["node1", "node1", "node2", "node2"]
        accounted = p["accounted"]["dispatch"]["ib"] + p["accounted"]["combine"]["ib"]
        link = p["link_bytes"] - p["empty_window_bytes"]
        payload = link - HEADER_BYTES * (p["link_packets"] - p["empty_window_packets"])
        print(f"{name}: link {link} bytes ({link / accounted:.3f}x the accounted {accounted}),"
              f" TCP payload {payload} ({payload / accounted:.3f}x)")
        assert accounted <= payload <= 1.2 * accounted, name
        # the all-to-all's count is the accounting's: one row per remote (token, expert)
        row_bytes = 4 * cfgs[name].model.d_model
        assert accounted == 2 * row_bytes * p["copies"]["per_expert"]["ib"]
    free, node = (probe[name]["copies"] for name in ("free", "node"))
    print(f"inter-node copies (free, node-limited): per_expert {free['per_expert']['ib']}, "
          f"{node['per_expert']['ib']}; dedup {free['dedup']['ib']}, {node['dedup']['ib']}")
    assert node["dedup"]["ib"] < free["dedup"]["ib"]


def test_batch_losses_with_all_reduced_counts_average_to_the_whole_batch_loss() -> None:
    """What each rank computes for switch / global (f from the summed counts, P from its own
    tokens), averaged over equal shares, is the loss of the whole batch, gradient included."""
    from moebench.balancing import global_loss, switch_loss

    gen = torch.Generator().manual_seed(0)
    scores_TE = torch.rand(24, 8, generator=gen, dtype=torch.float64).requires_grad_()
    experts_TK = torch.randint(0, 8, (24, 2), generator=gen)
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=8)
    for loss in (switch_loss, global_loss):
        whole = loss(scores_TE, experts_TK)
        (grad_whole,) = torch.autograd.grad(whole, scores_TE)
        shares = [loss(s, e, counts_E) for s, e in zip(scores_TE.split(6), experts_TK.split(6),
                                                          strict=True)]
        mean = torch.stack(shares).mean()
        (grad_mean,) = torch.autograd.grad(mean, scores_TE)
        torch.testing.assert_close(mean, whole)
        torch.testing.assert_close(grad_mean, grad_whole)
