"""Pure routing and dispatch functions."""

from ec2moe_jax.routing.dispatch import einsum_moe, gather_moe, ragged_moe
from ec2moe_jax.routing.topk import (
    Route,
    compute_capacity,
    load_balance_loss,
    router_z_loss,
    top_k_route,
)

__all__ = [
    "Route",
    "compute_capacity",
    "einsum_moe",
    "gather_moe",
    "load_balance_loss",
    "ragged_moe",
    "router_z_loss",
    "top_k_route",
]
