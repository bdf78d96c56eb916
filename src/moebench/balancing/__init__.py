"""Load balancing for MoE routers: auxiliary losses, the aux-loss-free bias, capacity and token
dropping (docs/balancing.md). Losses return the unweighted term (1 at perfect
balance); the caller multiplies by alpha."""

from moebench.balancing.bias import (
    RULES,
    BiasController,
    all_reduce_sum,
    initial_bias,
    update_bias,
)
from moebench.balancing.capacity import (
    POLICIES,
    device_drop,
    drop_by_capacity,
    expert_capacity,
    protected_sequences,
)
from moebench.balancing.losses import (
    GSHARD_FORMS,
    comm_loss,
    device_loss,
    expert_loss,
    global_loss,
    gshard_loss,
    literal_topk,
    seq_loss,
    switch_loss,
    z_loss,
)

__all__ = [
    "GSHARD_FORMS",
    "POLICIES",
    "RULES",
    "BiasController",
    "all_reduce_sum",
    "comm_loss",
    "device_drop",
    "device_loss",
    "drop_by_capacity",
    "expert_capacity",
    "expert_loss",
    "global_loss",
    "gshard_loss",
    "initial_bias",
    "literal_topk",
    "protected_sequences",
    "seq_loss",
    "switch_loss",
    "update_bias",
    "z_loss",
]
