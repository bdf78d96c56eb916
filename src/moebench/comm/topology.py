"""Cluster topology for communication accounting: an expert `Layout` (expert -> GPU -> node)
plus link bandwidths and the size of what travels.

Defaults follow DeepSeek-V3: NVLink 160 GB/s and InfiniBand 50 GB/s per GPU ([V3] §3.2.2),
dispatch in FP8 (1 byte per element) and combine in BF16 (2 bytes) ([V3] §3.3.4), hidden
size 7168 ([V3] §4.2). 1 GB = 1e9 bytes. GPUs are numbered node-major: GPU d is on node
d // G with in-node index d % G (as `Layout.node_of_device`).

Legend: E routed experts, D GPUs (devices), N nodes, G GPUs per node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moebench.routing import Layout

LINK_SELF, LINK_NVLINK, LINK_IB = 0, 1, 2


def _check_positive(name: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name}={value!r} is invalid; allowed: a finite number > 0")


@dataclass(frozen=True)
class Topology:
    """Expert placement plus what the accounting needs to turn copies into bytes and time.

    `hidden` is the number of elements per token copy; `dispatch_bytes` / `combine_bytes`
    the bytes per element of the dispatch and combine payloads; `nvlink_gbps` / `ib_gbps`
    the per-GPU, per-direction bandwidths in GB/s. Derived: `device_of_expert` (uint8, or
    uint16 beyond 256 GPUs) and `expert_shift` (log2(E/D) when the placement is contiguous
    and E/D a power of two, so GPU = expert >> shift; else None).
    """

    layout: Layout
    hidden: int = 7168
    dispatch_bytes: float = 1.0
    combine_bytes: float = 2.0
    nvlink_gbps: float = 160.0
    ib_gbps: float = 50.0
    device_of_expert: np.ndarray = field(init=False, repr=False, compare=False)
    expert_shift: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.layout, Layout):
            raise ValueError(
                f"layout={self.layout!r} is invalid; allowed: a moebench.routing.Layout"
            )
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"hidden={self.hidden!r} is invalid; allowed: an integer >= 1")
        for name in ("dispatch_bytes", "combine_bytes", "nvlink_gbps", "ib_gbps"):
            _check_positive(name, getattr(self, name))
        layout = self.layout
        if layout.num_devices > np.iinfo(np.uint16).max:
            raise ValueError(
                f"num_devices={layout.num_devices} is invalid; allowed: at most 65535 GPUs"
            )
        dtype = np.uint8 if layout.num_devices <= 256 else np.uint16
        object.__setattr__(self, "device_of_expert", layout.device_of_expert.numpy().astype(dtype))
        epd = layout.experts_per_device
        shift = epd.bit_length() - 1
        identity = layout.placement == tuple(range(layout.num_experts))
        object.__setattr__(self, "expert_shift", shift if identity and epd == 1 << shift else None)

    @classmethod
    def build(
        cls,
        num_experts: int,
        num_nodes: int,
        gpus_per_node: int,
        placement: list[int] | None = None,
        **kwargs: float,
    ) -> Topology:
        """A topology over `Layout(num_experts, num_nodes, gpus_per_node, placement)`."""
        return cls(Layout(num_experts, num_nodes, gpus_per_node, placement), **kwargs)

    @classmethod
    def v3(cls, **kwargs: float) -> Topology:
        """DeepSeek-V3 expert parallelism: 256 experts on 8 nodes x 8 GPUs ([V3] §3.2, §4.2)."""
        return cls.build(256, 8, 8, **kwargs)

    @property
    def num_nodes(self) -> int:
        return self.layout.num_nodes

    @property
    def gpus_per_node(self) -> int:
        return self.layout.gpus_per_node

    @property
    def num_devices(self) -> int:
        return self.layout.num_devices

    @property
    def name(self) -> str:
        """ "<nodes>x<gpus per node>", the `topology` column of the result tables."""
        return f"{self.num_nodes}x{self.gpus_per_node}"

    def link_class(self) -> np.ndarray:
        """int8 [D, D]: LINK_SELF on the diagonal, LINK_NVLINK within a node, LINK_IB across."""
        node_D = np.arange(self.num_devices) // self.gpus_per_node
        same_node = node_D[:, None] == node_D[None, :]
        cls_DD = np.where(same_node, LINK_NVLINK, LINK_IB).astype(np.int8)
        np.fill_diagonal(cls_DD, LINK_SELF)
        return cls_DD

    def bytes_per_copy(self, phase: str) -> float:
        """Bytes of one token copy in `phase` ("dispatch" or "combine")."""
        if phase == "dispatch":
            return self.hidden * self.dispatch_bytes
        if phase == "combine":
            return self.hidden * self.combine_bytes
        raise ValueError(f"phase={phase!r} is invalid; allowed: 'dispatch', 'combine'")
