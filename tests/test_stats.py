"""Routing statistics: hand-computed co-activation, invariants through the LM, persistence."""

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.config import load_config
from ec2moe_jax.models import MoELM, init_params, routing_stats
from ec2moe_jax.routing import load_stats, save_stats, stats_from_route, top_k_route
from ec2moe_jax.sharding import unbox


def test_hand_computed_counts_and_coactivation():
    # Token 0 picks experts (0, 1), token 1 picks (0, 2); expert 3 is never chosen.
    logits = jnp.log(jnp.array([[[0.5, 0.3, 0.1, 0.1], [0.6, 0.1, 0.2, 0.1]]]))
    counts, co = stats_from_route(top_k_route(logits, top_k=2, capacity_factor=0.5))
    np.testing.assert_array_equal(counts, [2, 1, 1, 0])  # before capacity: all choices count
    np.testing.assert_array_equal(co, [[2, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])


def test_masked_choice_is_not_counted():
    logits = jnp.array([[[3.0, 2.0, 1.0]]])
    counts, co = stats_from_route(top_k_route(logits, top_k=2,
                                              allowed=jnp.array([False, False, True])))
    np.testing.assert_array_equal(counts, [0, 0, 1])
    assert float(co.sum()) == 1.0


def test_stats_through_the_lm_and_round_trip(tmp_path):
    cfg = load_config("tiny").model
    model = MoELM(cfg)
    params = unbox(init_params(model, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, 256)
    stats = jax.jit(lambda p, t: routing_stats(model, p, t))(params, tokens)
    assert stats.counts.shape == (2, 8) and stats.coactivation.shape == (2, 8, 8)
    np.testing.assert_array_equal(stats.counts.sum(-1), [30 * 2, 30 * 2])  # tokens x K
    np.testing.assert_array_equal(jnp.diagonal(stats.coactivation, axis1=1, axis2=2),
                                  stats.counts)
    np.testing.assert_array_equal(stats.coactivation, jnp.swapaxes(stats.coactivation, 1, 2))
    np.testing.assert_allclose(stats.frequencies.sum(-1), 1.0, rtol=1e-6)
    allowed = jnp.zeros((2, 8), bool).at[:, :4].set(True)
    masked = routing_stats(model, params, tokens, allowed)
    assert float(masked.counts[:, 4:].sum()) == 0.0
    total = stats + masked
    np.testing.assert_array_equal(total.counts, stats.counts + masked.counts)
    save_stats(total, str(tmp_path / "stats.npz"))
    back = load_stats(str(tmp_path / "stats.npz"))
    np.testing.assert_array_equal(back.coactivation, total.coactivation)
    assert float(back.tokens) == 60.0
