"""Communication accounting of one MoE layer's routing: GPUs and nodes per token, token copies
per link class (NVLink inside a node, InfiniBand across), per-GPU copy matrices, bytes and a
modeled all-to-all time, for two dispatchers.

Conventions (ours; stated because no source fixes them):
- Source GPU of a token: the T tokens of a layer are split into D contiguous blocks, token t
  lives on GPU floor(t * D / T) (data-parallel shards of one global batch; routing_trace
  tokens are in sequence order, so a GPU holds whole sequences when T / D is a multiple of
  the sequence length).
- A copy to the token's own GPU costs no link bytes (the diagonal of every matrix is 0).
- "per_expert": one copy per (token, expert) pair, sent straight to the expert's GPU (plain
  all-to-all, e.g. torchtitan and Megatron's all-to-all dispatcher; docs/peers.md). Two experts on
  one GPU cost two copies.
- "dedup": V3's scheme ([V3] §3.2.2): one IB copy per distinct remote target node, to the GPU
  with the source's in-node index on that node, then one NVLink copy from that relay to
  every other distinct target GPU of the node; inside the source node, one NVLink copy per
  distinct target GPU other than the source. Equivalently, every distinct target GPU whose
  in-node index differs from the source's gets exactly one NVLink copy, sent by the GPU of
  its node with the source's in-node index.
- Combine is the reverse path of dispatch (same copies, transposed matrix, [V3] §3.2.2
  "combine: the reverse"), with partial sums accumulated on the way, so it moves as many
  copies as dispatch, at `combine_bytes` per element.
- Modeled time: bandwidth only (no latency), links full duplex, IB and NVLink used
  concurrently (V3 overlaps them); a phase takes as long as its busiest GPU needs for its
  busiest (link, direction): max over GPUs of max(send, recv) / bandwidth. Transposing
  swaps send and receive, so combine takes dispatch's time times combine/dispatch bytes.

Implementation: tokens are processed in chunks of [K, C] uint8 (uint16 past 256 GPUs)
arrays; each token's K GPU ids are sorted by a Batcher odd-even merge network (K log^2 K
elementwise min/max), so "first occurrence of a GPU / node" is a comparison with the
previous slot. `token_stats` reduces these masks to counts (the fast replay path); `traffic`
also bincounts them into per-source-GPU histograms, from which the copy matrices follow
exactly.

Legend: T tokens, K experts per token, C tokens of a chunk, E experts, D GPUs, N nodes,
G GPUs per node, S source GPUs.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from moebench.comm.topology import LINK_IB, LINK_NVLINK, Topology

DISPATCHERS = ("per_expert", "dedup")
LINKS = ("nvlink", "ib")
CHUNK_TOKENS = 65536  # tokens per chunk: rows of 64 KiB (uint8), measured best on 2 cores
_MAX_BINS = 1 << 20  # cap on the per-chunk histogram of `traffic` (int64 bins)

R = TypeVar("R")


def expected_groups_uniform(num_experts: int, num_groups: int, top_k: int) -> float:
    """Expected distinct groups per token when k of E experts are drawn uniformly without
    replacement, E/G experts per group: G * (1 - C(E - E/G, k) / C(E, k)) (docs/metrics.md §3;
    5.29 nodes for E=256, G=8, k=8)."""
    if num_groups < 1 or num_experts % num_groups or not 1 <= top_k <= num_experts:
        raise ValueError(
            f"num_experts={num_experts}, num_groups={num_groups}, top_k={top_k} are invalid; "
            "allowed: num_groups >= 1 dividing num_experts, 1 <= top_k <= num_experts"
        )
    outside = math.comb(num_experts - num_experts // num_groups, top_k)
    return num_groups * (1.0 - outside / math.comb(num_experts, top_k))


@functools.cache
def _batcher_pairs(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators (i, j), i < j, of Batcher's odd-even merge sort for n inputs (comparators
    reaching past n dropped, which is exact since the padding would be +inf)."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def _as_numpy(experts_TK: np.ndarray | torch.Tensor, topo: Topology) -> np.ndarray:
    """The routing as a numpy [T, K] integer array, checked against the topology."""
    if isinstance(experts_TK, torch.Tensor):
        experts_TK = experts_TK.detach().cpu().numpy()
    if experts_TK.ndim != 2 or experts_TK.shape[1] < 1 or experts_TK.dtype.kind not in "iu":
        raise ValueError(
            f"experts_TK shape={experts_TK.shape} dtype={experts_TK.dtype} is invalid; "
            "allowed: an integer array [T, K] with K >= 1"
        )
    if experts_TK.size and (experts_TK.min() < 0 or experts_TK.max() >= topo.layout.num_experts):
        raise ValueError(
            f"experts_TK holds ids in [{experts_TK.min()}, {experts_TK.max()}]; allowed: "
            f"0..{topo.layout.num_experts - 1}"
        )
    return experts_TK


def _device_sets(
    experts_CK: np.ndarray, topo: Topology
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per token of a chunk: GPU ids sorted ascending (dev_KC), their nodes (node_KC), and
    bool masks marking the first slot of each distinct GPU (new_dev_KC) and node (new_node_KC)."""
    C, K = experts_CK.shape
    dtype = topo.device_of_expert.dtype
    dev_CK = np.empty((C, K), dtype)
    if topo.expert_shift is not None:
        np.right_shift(experts_CK, topo.expert_shift, out=dev_CK, casting="unsafe")
    else:
        np.take(topo.device_of_expert, experts_CK, out=dev_CK)
    dev_KC = np.ascontiguousarray(dev_CK.T)
    rows = list(dev_KC)
    spare = np.empty(C, dtype)
    for a, b in _batcher_pairs(K):
        np.minimum(rows[a], rows[b], out=spare)
        np.maximum(rows[a], rows[b], out=rows[b])
        rows[a], spare = spare, rows[a]
    dev_KC = np.stack(rows)
    node_KC = dev_KC // dtype.type(topo.gpus_per_node)
    new_dev_KC = np.ones((K, C), bool)
    new_node_KC = np.ones((K, C), bool)
    np.not_equal(dev_KC[1:], dev_KC[:-1], out=new_dev_KC[1:])
    np.not_equal(node_KC[1:], node_KC[:-1], out=new_node_KC[1:])
    return dev_KC, node_KC, new_dev_KC, new_node_KC


def _source_gpu(lo: int, hi: int, num_tokens: int, num_devices: int) -> np.ndarray:
    """int64 [C]: source GPU floor(t * D / T) of tokens lo..hi-1 (contiguous blocks)."""
    return np.arange(lo, hi, dtype=np.int64) * num_devices // num_tokens


def _joint_hist(new_dev_KC: np.ndarray, new_node_KC: np.ndarray) -> np.ndarray:
    """int64 [K+1, K+1]: tokens of the chunk touching i GPUs and j nodes."""
    K = new_dev_KC.shape[0]
    dtype = np.uint8 if (K + 1) ** 2 <= 256 else np.uint16
    code_C = np.full(new_dev_KC.shape[1], K + 2, dtype)  # slot 0: always a new GPU and node
    for j in range(1, K):
        code_C += new_dev_KC[j].view(np.uint8) * dtype(K + 1)
        code_C += new_node_KC[j].view(np.uint8)
    counts = np.bincount(code_C.astype(np.intp), minlength=(K + 1) ** 2)
    return counts.reshape(K + 1, K + 1)


def _map_chunks(
    fn: Callable[[int, int], R], num_tokens: int, chunk: int, threads: int | None
) -> list[R]:
    """fn(lo, hi) over chunks of the token range, on `threads` threads (numpy releases the GIL
    inside its elementwise loops, so chunks overlap)."""
    bounds = [(lo, min(lo + chunk, num_tokens)) for lo in range(0, num_tokens, chunk)]
    workers = threads or os.cpu_count() or 1
    if workers == 1 or len(bounds) == 1:
        return [fn(lo, hi) for lo, hi in bounds]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda b: fn(*b), bounds))


@dataclass(frozen=True)
class TokenStats:
    """Per-token accounting of one layer: the joint histogram of (GPUs, nodes) touched per
    token and the dispatch copies per dispatcher and link class (`copies[d][link]`)."""

    num_tokens: int
    joint_hist: np.ndarray
    copies: dict[str, dict[str, int]]

    @property
    def devices_hist(self) -> np.ndarray:
        """int64 [K+1]: tokens whose experts lie on exactly i GPUs."""
        return self.joint_hist.sum(1)

    @property
    def nodes_hist(self) -> np.ndarray:
        """int64 [K+1]: tokens whose experts lie on exactly j nodes."""
        return self.joint_hist.sum(0)

    @property
    def devices_per_token(self) -> float:
        return float(self.devices_hist @ np.arange(len(self.devices_hist))) / self.num_tokens

    @property
    def nodes_per_token(self) -> float:
        return float(self.nodes_hist @ np.arange(len(self.nodes_hist))) / self.num_tokens


def token_stats(
    experts_TK: np.ndarray | torch.Tensor,
    topo: Topology,
    threads: int | None = None,
    chunk: int = CHUNK_TOKENS,
) -> TokenStats:
    """Per-token accounting of one layer's routing (the fast replay path, no matrices)."""
    experts_TK = _as_numpy(experts_TK, topo)
    T = len(experts_TK)
    if T == 0:
        raise ValueError("experts_TK has T=0 tokens; allowed: T >= 1")
    D, G = topo.num_devices, topo.gpus_per_node
    ranks = np.arange(experts_TK.shape[1] + 1)

    def run(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        dev_KC, node_KC, new_dev_KC, new_node_KC = _device_sets(experts_TK[lo:hi], topo)
        src_C = _source_gpu(lo, hi, T, D).astype(dev_KC.dtype)
        same_node_KC = node_KC == src_C // G
        relay_KC = node_KC * G + src_C % G  # the GPU of each node with the source's index
        own_node = np.count_nonzero(same_node_KC)
        joint = _joint_hist(new_dev_KC, new_node_KC)
        counts = np.array(
            [
                own_node - np.count_nonzero(dev_KC == src_C),  # per_expert nvlink
                dev_KC.size - own_node,  # per_expert ib
                # dedup: distinct GPUs / remote nodes (sums from the joint histogram) minus
                # the relays (own GPU included) / the own node
                joint.sum(1) @ ranks - np.count_nonzero(new_dev_KC & (dev_KC == relay_KC)),
                joint.sum(0) @ ranks - np.count_nonzero(new_node_KC & same_node_KC),
            ]
        )
        return joint, counts

    parts = _map_chunks(run, T, chunk, threads)
    pe_nvl, pe_ib, dd_nvl, dd_ib = (int(c) for c in sum(p[1] for p in parts))
    return TokenStats(
        num_tokens=T,
        joint_hist=sum(p[0] for p in parts),
        copies={
            "per_expert": {"nvlink": pe_nvl, "ib": pe_ib},
            "dedup": {"nvlink": dd_nvl, "ib": dd_ib},
        },
    )


@dataclass(frozen=True)
class Traffic:
    """Full accounting of one layer: the joint (GPUs, nodes) histogram and, per dispatcher,
    `matrices[d]` int64 [D, D] = dispatch copies sent from GPU a to GPU b (combine sends
    the transpose)."""

    num_tokens: int
    joint_hist: np.ndarray
    matrices: dict[str, np.ndarray]

    def token_stats(self, topo: Topology) -> TokenStats:
        """The per-token view of these matrices (equals `token_stats` of the same routing)."""
        cls_DD = topo.link_class()
        copies = {
            name: {
                "nvlink": int(m[cls_DD == LINK_NVLINK].sum()),
                "ib": int(m[cls_DD == LINK_IB].sum()),
            }
            for name, m in self.matrices.items()
        }
        return TokenStats(self.num_tokens, self.joint_hist, copies)


def traffic(
    experts_TK: np.ndarray | torch.Tensor,
    topo: Topology,
    threads: int | None = None,
    chunk: int = CHUNK_TOKENS,
) -> Traffic:
    """Full accounting of one layer's routing, with per-GPU copy matrices per dispatcher.

    Per source GPU s, a histogram H[s, c, d] counts (token, slot) pairs on GPU d of class
    c = 0 (GPU already used by the token), 1 (first slot on d, node already used), 2 (first
    slot on d and on its node). Then per_expert[s, d] = sum_c H; the dedup IB copies
    s -> (n*G + s%G) count the tokens of s touching node n (class 2), and the dedup NVLink
    copies (n(d)*G + s%G) -> d count the tokens of s touching d (classes 1, 2).
    """
    experts_TK = _as_numpy(experts_TK, topo)
    T, K = experts_TK.shape
    if T == 0:
        raise ValueError("experts_TK has T=0 tokens; allowed: T >= 1")
    D, G, N = topo.num_devices, topo.gpus_per_node, topo.num_nodes
    sources_per_chunk = max(1, _MAX_BINS // (3 * D) - 1)
    chunk = max(1, min(chunk, sources_per_chunk * T // D))

    def run(lo: int, hi: int) -> tuple[np.ndarray, int, np.ndarray]:
        dev_KC, _, new_dev_KC, new_node_KC = _device_sets(experts_TK[lo:hi], topo)
        src_C = _source_gpu(lo, hi, T, D)
        s_lo, n_src = int(src_C[0]), int(src_C[-1] - src_C[0]) + 1
        idx_KC = (new_dev_KC.view(np.uint8) + new_node_KC.view(np.uint8)).astype(np.intp)
        idx_KC *= D
        idx_KC += dev_KC
        if n_src > 1:
            idx_KC += (src_C - s_lo) * (3 * D)
        hist = np.bincount(idx_KC.ravel(), minlength=n_src * 3 * D).reshape(n_src, 3, D)
        return _joint_hist(new_dev_KC, new_node_KC), s_lo, hist

    H_SCD = np.zeros((D, 3, D), np.int64)
    joint = np.zeros((K + 1, K + 1), np.int64)
    for part_joint, s_lo, hist in _map_chunks(run, T, chunk, threads):
        joint += part_joint
        H_SCD[s_lo : s_lo + len(hist)] += hist

    src_S = np.arange(D)
    per_expert = H_SCD.sum(1)
    dedup = np.zeros((D, D), np.int64)
    node_SN = H_SCD[:, 2].reshape(D, N, G).sum(2)
    relay_SN = np.arange(N)[None, :] * G + (src_S % G)[:, None]
    dedup[src_S[:, None], relay_SN] = node_SN  # IB hop; (s, own node) lands on the diagonal
    dev_SD = H_SCD[:, 1] + H_SCD[:, 2]
    sender_SD = (np.arange(D) // G)[None, :] * G + (src_S % G)[:, None]
    np.add.at(dedup, (sender_SD, np.broadcast_to(np.arange(D), (D, D))), dev_SD)  # NVLink hop
    for m in (per_expert, dedup):
        np.fill_diagonal(m, 0)  # copies to the GPU itself cost nothing
    return Traffic(T, joint, {"per_expert": per_expert, "dedup": dedup})


def gpu_time_s(copies_DD: np.ndarray, topo: Topology, phase: str) -> np.ndarray:
    """float64 [D]: modeled seconds each GPU needs for `phase` ("dispatch" sends copies_DD,
    "combine" its transpose): max over links and directions of bytes / bandwidth."""
    copies_DD = copies_DD if phase == "dispatch" else copies_DD.T
    bytes_DD = copies_DD * topo.bytes_per_copy(phase)
    cls_DD = topo.link_class()
    time_D = np.zeros(topo.num_devices)
    for link, gbps in ((LINK_NVLINK, topo.nvlink_gbps), (LINK_IB, topo.ib_gbps)):
        on_link = np.where(cls_DD == link, bytes_DD, 0.0)
        busiest = np.maximum(on_link.sum(1), on_link.sum(0))
        time_D = np.maximum(time_D, busiest / (gbps * 1e9))
    return time_D


def summarize(
    stats: TokenStats, topo: Topology, traffic: Traffic | None = None
) -> list[dict[str, Any]]:
    """One row per dispatcher: GPUs/nodes per token (mean and histogram), bytes per token and
    in total per link class and phase, and, given `traffic`, the busiest GPU and the modeled
    all-to-all times in microseconds (dispatch, combine, and their sum `a2a_time_modeled_us`).
    `*_bytes_per_token` without a phase is dispatch + combine."""
    rows = []
    T = stats.num_tokens
    for name in DISPATCHERS:
        row: dict[str, Any] = {
            "dispatcher": name,
            "tokens": T,
            "devices_per_token": stats.devices_per_token,
            "nodes_per_token": stats.nodes_per_token,
            "devices_hist": stats.devices_hist.tolist(),
            "nodes_hist": stats.nodes_hist.tolist(),
        }
        for link in LINKS:
            copies = stats.copies[name][link]
            row[f"{link}_copies_per_token"] = copies / T
            total = 0.0
            for phase in ("dispatch", "combine"):
                phase_bytes = copies * topo.bytes_per_copy(phase)
                row[f"{link}_{phase}_bytes_per_token"] = phase_bytes / T
                total += phase_bytes
            row[f"{link}_bytes_per_token"] = total / T
            row[f"{link}_bytes_total"] = total
        if traffic is not None:
            m = traffic.matrices[name]
            dispatch_D = gpu_time_s(m, topo, "dispatch")
            combine_D = gpu_time_s(m, topo, "combine")
            row["busiest_gpu"] = int(np.argmax(dispatch_D))
            row["a2a_dispatch_us"] = float(dispatch_D.max() * 1e6)
            row["a2a_combine_us"] = float(combine_D.max() * 1e6)
            row["a2a_time_modeled_us"] = row["a2a_dispatch_us"] + row["a2a_combine_us"]
        rows.append(row)
    return rows
