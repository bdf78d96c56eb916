"""Bytes on the link between the two test nodes during one forward pass of a distributed
model, beside moebench's accounting of that pass's inter-node all-to-all.

Run as one task of `srun --nodes 2 --ntasks-per-node 2` on the two-node cluster
(two-node-cluster.sh): `python link_probe.py RUN.yaml... --out probe.json`. For each config,
every rank builds the run's model (its expert shard), runs the first training batch's
forward once to warm up, then again between two reads of node1's ib0 counters (rx + tx in
/proc/net/dev: both directions of the one link between the nodes), each read after a
barrier and a pause that lets delayed TCP ACKs out. An empty window (barriers only) measures
what the reading costs. Rank 0 writes {config: {"link_bytes", "link_packets",
"empty_window_bytes", "empty_window_packets", "hosts" (of the ranks), "accounted": {phase:
{link: bytes}} (the all-to-all's own count), "copies": {dispatcher: {link: copies}}
(`moebench.comm.accounting` of the pass's routing)}}."""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moebench.comm.accounting import DISPATCHERS, traffic
from moebench.comm.alltoall import LINKS, PHASES
from moebench.comm.topology import Topology
from moebench.config import RunConfig
from moebench.train import Trainer, prepare
from moebench.train.distributed import Parallel, ProcessLaunch, process_group

LINK = "ib0"


def link_counters() -> torch.Tensor:
    """[bytes, packets] of LINK in this network namespace, received plus sent."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == LINK:
            f = [int(x) for x in counters.split()]
            return torch.tensor([f[0] + f[8], f[1] + f[9]])
    raise RuntimeError(f"no interface {LINK} in /proc/net/dev")


def read(par: Parallel) -> torch.Tensor:
    """The link's counters, read by rank 0 once every rank is idle."""
    dist.barrier()
    time.sleep(0.3)
    value = link_counters() if par.rank == 0 else torch.zeros(2, dtype=torch.int64)
    dist.barrier()
    return value


def probe(cfg: RunConfig, par: Parallel, folder: Path) -> dict[str, object]:
    trainer = Trainer(prepare(cfg, folder / "run", folder / "ckpt", par))
    t = cfg.train
    tokens_BS, targets_BS = (x[par.rows(t.batch_size)] for x in trainer.run_spec.train_data.batch(
        trainer.batch_generator, t.batch_size, t.seq_len))
    bias_LE = trainer.bias.bias_LE if trainer.bias is not None else None
    with torch.no_grad():
        trainer.model(tokens_BS, targets_BS, bias_LE)
        before = read(par)
        out = trainer.model(tokens_BS, targets_BS, bias_LE)
        after = read(par)
        empty = read(par) - after
    topo = Topology(par.ep.rank_layout, hidden=cfg.model.d_model)
    copies = {d: dict.fromkeys(LINKS, 0) for d in DISPATCHERS}
    for routing in out.layers:  # every rank's routing of the layer, in rank order
        parts = [torch.empty_like(routing.experts_TK) for _ in range(par.world_size)]
        dist.all_gather(parts, routing.experts_TK)
        for d, per_link in traffic(torch.cat(parts), topo, threads=1).token_stats(topo
                                                                                ).copies.items():
            for link, n in per_link.items():
                copies[d][link] += n
    sent = torch.tensor([[sum(r.comm.link_bytes[p][link] for r in out.layers) for link in LINKS]
                         for p in PHASES])
    par.sum(sent)
    (link, packets), (empty_link, empty_packets) = (after - before).tolist(), empty.tolist()
    return {"link_bytes": link, "link_packets": packets, "empty_window_bytes": empty_link,
            "empty_window_packets": empty_packets, "hosts": par.all_objects(socket.gethostname()),
            "copies": copies,
            "accounted": {p: dict(zip(LINKS, sent[i].tolist(), strict=True))
                          for i, p in enumerate(PHASES)}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    launch = ProcessLaunch.from_env()
    cfgs = {path.stem: RunConfig.model_validate_json(path.read_text()) for path in args.configs}
    results = {}
    cpu = torch.device("cpu")
    with process_group(next(iter(cfgs.values())), launch, cpu):
        for name, cfg in cfgs.items():
            results[name] = probe(cfg, Parallel(cfg, launch, cpu), args.out.parent / name)
    if launch.rank == 0:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
