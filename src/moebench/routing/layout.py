"""Expert -> device -> node placement (`Layout`), shared by routing, balancing, metrics, comm.

Experts are placed in slots; slot j lives on device j // (E / D) and device d on node
d // gpus_per_node. The default placement is the identity, i.e. contiguous blocks of
experts per device, as in the official DeepSeek code's group view [V3-code]; a
permutation `placement[i] = slot of expert i` models any other expert-parallel layout.

Legend: E routed experts, D devices (GPUs) = num_nodes * gpus_per_node, N nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Layout:
    """Where every routed expert lives; tensors are int64 on CPU (move them as needed).

    Attributes set from the arguments: `device_of_expert` [E], `node_of_expert` [E],
    `node_of_device` [D]. `placement` is stored as a tuple (identity when omitted).
    """

    num_experts: int
    num_nodes: int
    gpus_per_node: int
    placement: Sequence[int] | torch.Tensor | None = None
    device_of_expert: torch.Tensor = field(init=False, repr=False, compare=False)
    node_of_expert: torch.Tensor = field(init=False, repr=False, compare=False)
    node_of_device: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_nodes", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")
        devices = self.num_nodes * self.gpus_per_node
        if self.num_experts % devices:
            raise ValueError(
                f"num_experts={self.num_experts} is not divisible by num_nodes x gpus_per_node"
                f" = {self.num_nodes} x {self.gpus_per_node} = {devices} devices; allowed: "
                f"num_experts a multiple of {devices}"
            )
        slot_E = self._placement_tensor()
        object.__setattr__(self, "placement", tuple(slot_E.tolist()))
        device_of_expert = slot_E // self.experts_per_device
        node_of_device = torch.arange(devices) // self.gpus_per_node
        object.__setattr__(self, "device_of_expert", device_of_expert)
        object.__setattr__(self, "node_of_device", node_of_device)
        object.__setattr__(self, "node_of_expert", node_of_device[device_of_expert])

    def _placement_tensor(self) -> torch.Tensor:
        """The placement as int64 [E], checked to be a permutation of 0..E-1."""
        if self.placement is None:
            return torch.arange(self.num_experts)
        slot_E = torch.as_tensor(self.placement)
        if (
            slot_E.dtype.is_floating_point
            or slot_E.dtype.is_complex
            or slot_E.dtype == torch.bool
            or slot_E.shape != (self.num_experts,)
            or not torch.equal(torch.sort(slot_E.long()).values, torch.arange(self.num_experts))
        ):
            raise ValueError(
                f"placement={self.placement!r} is invalid; allowed: a permutation of "
                f"0..{self.num_experts - 1} (placement[i] = slot of expert i), or None"
            )
        return slot_E.long().cpu()

    @classmethod
    def contiguous(cls, num_experts: int, num_nodes: int, gpus_per_node: int) -> Layout:
        """Experts in contiguous blocks: expert i on device i // (E / D)."""
        return cls(num_experts, num_nodes, gpus_per_node)

    @property
    def num_devices(self) -> int:
        """D = num_nodes * gpus_per_node."""
        return self.num_nodes * self.gpus_per_node

    @property
    def experts_per_device(self) -> int:
        """E / D."""
        return self.num_experts // self.num_devices

    @property
    def experts_per_node(self) -> int:
        """E / N."""
        return self.num_experts // self.num_nodes
