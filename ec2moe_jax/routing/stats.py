"""Routing statistics: how often each expert is chosen, and which experts fire together.

Shape legend: L MoE layers, E experts, G groups, S tokens per group, K top-k.

Hardware-aware expert selection and the route-aware scheduler both consume these: selection
keeps the experts covering the most routing mass, the scheduler predicts per-expert load.
Statistics are sums (so batches combine by addition) and are saved as plain ``.npz`` arrays.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.files import atomic_write
from ec2moe_jax.routing.topk import Route


@flax.struct.dataclass
class RoutingStats:
    """Attributes:
    counts: <float32>[L, E] allowed choices of each expert (before capacity).
    coactivation: <float32>[L, E, E] tokens that chose both experts (diagonal = counts).
    tokens: <float32>[] tokens routed (per layer).
    """

    counts: jax.Array
    coactivation: jax.Array
    tokens: jax.Array

    def __add__(self, other: RoutingStats) -> RoutingStats:
        return jax.tree.map(jnp.add, self, other)

    @property
    def frequencies(self) -> jax.Array:
        """<float32>[L, E] share of the routing mass each expert receives (rows sum to 1)."""
        return self.counts / jnp.maximum(self.counts.sum(-1, keepdims=True), 1.0)


def stats_from_route(route: Route) -> tuple[jax.Array, jax.Array]:
    """Per-layer sums from one :class:`Route`: counts [E] and co-activation [E, E].

    Every valid choice counts, whether or not it fit its expert's capacity: statistics
    describe what the router wants, not what one capacity setting let through.
    """
    onehot = jax.nn.one_hot(route.expert_index, route.num_experts)  # [G, S, K, E]
    chosen = jnp.sum(onehot * route.valid[..., None], axis=2)  # [G, S, E], K choices distinct
    return chosen.sum((0, 1)), jnp.einsum("gse,gsf->ef", chosen, chosen)


def stats_from_routes(routes: list[Route]) -> RoutingStats:
    """Stacks the statistics of the MoE layers of one forward pass."""
    if not routes:
        raise ValueError("no MoE layers: there are no routing statistics to collect")
    counts, co = zip(*(stats_from_route(r) for r in routes), strict=True)
    g, s = routes[0].expert_index.shape[:2]
    return RoutingStats(jnp.stack(counts), jnp.stack(co), jnp.asarray(g * s, jnp.float32))


def save_stats(stats: RoutingStats, path: str) -> None:
    """Writes the statistics as ``.npz`` (atomically)."""
    with atomic_write(path, "wb") as f:
        np.savez(f, counts=np.asarray(stats.counts), coactivation=np.asarray(stats.coactivation),
                 tokens=np.asarray(stats.tokens))


def load_stats(path: str) -> RoutingStats:
    with np.load(path, allow_pickle=False) as f:
        return RoutingStats(jnp.asarray(f["counts"]), jnp.asarray(f["coactivation"]),
                            jnp.asarray(f["tokens"]))
