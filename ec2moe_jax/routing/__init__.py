"""Pure routing and dispatch functions."""

from ec2moe_jax.routing.dispatch import (
    einsum_moe,
    gather_moe,
    gathered_moe,
    looped_moe,
    ragged_moe,
)
from ec2moe_jax.routing.masks import expert_rank, top_n_mask
from ec2moe_jax.routing.stats import (
    RoutingStats,
    load_stats,
    save_stats,
    stats_from_route,
    stats_from_routes,
)
from ec2moe_jax.routing.topk import (
    Route,
    compute_capacity,
    load_balance_loss,
    router_z_loss,
    top_k_route,
)

__all__ = [
    "Route",
    "RoutingStats",
    "compute_capacity",
    "einsum_moe",
    "expert_rank",
    "gather_moe",
    "gathered_moe",
    "looped_moe",
    "load_balance_loss",
    "load_stats",
    "ragged_moe",
    "router_z_loss",
    "save_stats",
    "stats_from_route",
    "stats_from_routes",
    "top_k_route",
    "top_n_mask",
]
