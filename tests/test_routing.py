"""Top-k routing: hand-computed cases, a slow NumPy reference, and invariants."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from ec2moe_jax.routing import compute_capacity, load_balance_loss, router_z_loss, top_k_route


def reference_route(logits, k, capacity, renormalize, allowed):
    """Slow loop reference for one group: [S, E] -> per-choice arrays [S, K]."""
    s_len, e = logits.shape
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    masked = np.where(allowed, logits, -np.inf)
    index = np.argsort(-masked, axis=-1, kind="stable")[:, :k]
    valid = np.take_along_axis(allowed, index, -1)
    w = np.take_along_axis(probs, index, -1) * valid
    if renormalize:
        w = w / np.maximum(w.sum(-1, keepdims=True), 1e-9)
    fill = np.zeros(e, int)
    position = np.zeros((s_len, k), int)
    kept = np.zeros((s_len, k), bool)
    for j in range(k):  # all first choices before any second choice
        for s in range(s_len):
            if valid[s, j]:
                position[s, j] = fill[index[s, j]]
                fill[index[s, j]] += 1
                kept[s, j] = position[s, j] < capacity
    return index, np.where(kept, w, 0.0), kept


def test_hand_computed_top2_with_capacity_one():
    # Two tokens, three experts, K=2, C=1. Token 0 prefers e0 then e1; token 1 prefers e0 then
    # e2. First choices come first: token 0 gets e0's only slot, token 1's first choice (e0)
    # is dropped, then token 0's e1 and token 1's e2 fit.
    logits = jnp.log(jnp.array([[[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]]]))
    r = top_k_route(logits, top_k=2, capacity_factor=0.5, renormalize=False)
    assert r.capacity == 1  # ceil(2 * 2 * 0.5 / 3) = 1
    np.testing.assert_array_equal(r.expert_index[0], [[0, 1], [0, 2]])
    np.testing.assert_array_equal(r.kept[0], [[True, True], [False, True]])
    assert_close(r.combine_weights[0], [[0.5, 0.3], [0.0, 0.3]])
    np.testing.assert_array_equal(r.expert_counts[0], [2, 1, 1])
    np.testing.assert_array_equal(r.expert_load[0], [1, 1, 1])
    assert_close(r.dropped_fraction, 0.25)


def test_hand_computed_renormalised_weights():
    # Probabilities (0.5, 0.3, 0.2): top-2 renormalised gives 0.5/0.8 and 0.3/0.8.
    logits = jnp.log(jnp.array([[[0.5, 0.3, 0.2]]]))
    r = top_k_route(logits, top_k=2, renormalize=True)
    assert_close(r.combine_weights[0, 0], [0.625, 0.375])


def test_mask_selects_but_unbiased_probs_weight():
    # e0 is masked: choices are e1, e2; weights are the unbiased probs 0.3, 0.2 (no renorm).
    logits = jnp.log(jnp.array([[[0.5, 0.3, 0.2]]]))
    r = top_k_route(logits, top_k=2, renormalize=False, allowed=jnp.array([False, True, True]))
    np.testing.assert_array_equal(r.expert_index[0, 0], [1, 2])
    assert_close(r.combine_weights[0, 0], [0.3, 0.2])
    assert_close(r.probs[0, 0], [0.5, 0.3, 0.2])


def test_fewer_allowed_than_k_never_chooses_masked():
    logits = jnp.array([[[5.0, 1.0, 0.0, -1.0]]])
    r = top_k_route(logits, top_k=2, allowed=jnp.array([False, False, True, False]))
    assert bool(r.kept[0, 0, 0]) and not bool(r.kept[0, 0, 1])
    assert int(r.expert_index[0, 0, 0]) == 2
    assert_close(r.combine_weights[0, 0], [1.0, 0.0])
    np.testing.assert_array_equal(r.expert_counts[0], [0, 0, 1, 0])


def test_all_masked_processes_nothing():
    r = top_k_route(jnp.ones((1, 3, 4)), top_k=2, allowed=jnp.zeros(4, bool))
    assert not bool(r.kept.any())
    assert float(jnp.abs(r.combine_weights).sum()) == 0.0


def test_compute_capacity():
    assert compute_capacity(128, 8, 2, 1.25) == 40
    assert compute_capacity(128, 8, 2, None) == 128  # dropless
    assert compute_capacity(4, 2, 2, 100.0) == 4  # capped at S
    assert compute_capacity(1, 8, 2, 1.0) == 1
    with pytest.raises(ValueError, match="capacity_factor=0"):
        compute_capacity(8, 2, 1, 0)


def test_load_balance_loss_is_one_when_uniform_and_z_loss_value():
    probs = jnp.full((4, 4), 0.25)
    choice = jax.nn.one_hot(jnp.array([[0], [1], [2], [3]]), 4)
    assert_close(load_balance_loss(probs, choice), 1.0)
    # All mass on one expert with every choice there: E * 1 * 1 = 4.
    collapsed = jax.nn.one_hot(jnp.zeros((4, 1), int), 4)
    assert_close(load_balance_loss(jax.nn.one_hot(jnp.zeros(4, int), 4), collapsed), 4.0)
    assert_close(router_z_loss(jnp.zeros((2, 3))), np.log(3.0) ** 2)


def test_bad_arguments_raise_clearly():
    with pytest.raises(ValueError, match="top_k=5"):
        top_k_route(jnp.zeros((1, 2, 4)), top_k=5)
    with pytest.raises(ValueError, match=r"\[G, S, E\]"):
        top_k_route(jnp.zeros((2, 4)), top_k=1)
    with pytest.raises(ValueError, match="allowed has 3 experts"):
        top_k_route(jnp.zeros((1, 2, 4)), top_k=1, allowed=jnp.ones(3, bool))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("factor", [0.5, 1.0, None])
def test_matches_numpy_reference(renormalize, factor):
    rng = np.random.default_rng(7)
    g, s, e, k = 3, 16, 6, 2
    logits = rng.normal(size=(g, s, e)).astype(np.float32) * 2
    allowed = rng.random((g, e)) < 0.7
    r = top_k_route(jnp.asarray(logits), top_k=k, capacity_factor=factor,
                    renormalize=renormalize, allowed=jnp.asarray(allowed))
    for gi in range(g):
        al = np.broadcast_to(allowed[gi], (s, e))
        index, w, kept = reference_route(logits[gi], k, r.capacity, renormalize, al)
        np.testing.assert_array_equal(np.asarray(r.kept[gi]), kept)
        np.testing.assert_array_equal(np.where(kept, np.asarray(r.expert_index[gi]), -1),
                                      np.where(kept, index, -1))
        assert_close(r.combine_weights[gi], w)


@settings(max_examples=25, deadline=None)
@given(
    logits=hnp.arrays(np.float32, (2, 12, 5), elements=st.floats(-8, 8, width=32)),
    allowed=hnp.arrays(np.bool_, (2, 12, 5)),
    k=st.integers(1, 3),
    factor=st.sampled_from([0.5, 1.0, 2.0, None]),
)
def test_property_masked_never_chosen_and_load_within_capacity(logits, allowed, k, factor):
    r = top_k_route(jnp.asarray(logits), top_k=k, capacity_factor=factor,
                    allowed=jnp.asarray(allowed))
    chosen_allowed = np.take_along_axis(allowed, np.asarray(r.expert_index), -1)
    assert not np.any(np.asarray(r.kept) & ~chosen_allowed)  # masked never chosen
    assert np.all(np.asarray(r.combine_weights)[~chosen_allowed] == 0)
    assert np.all(np.asarray(r.expert_load) <= r.capacity)  # never above capacity
    w = np.asarray(r.combine_weights)
    assert np.all(w >= 0)
    # Renormalised: weights sum to 1 over the chosen (allowed) experts before drops.
    dropless = top_k_route(jnp.asarray(logits), top_k=k, allowed=jnp.asarray(allowed))
    sums = np.asarray(dropless.combine_weights).sum(-1)
    has_any = allowed.any(-1)
    np.testing.assert_allclose(sums[has_any], 1.0, rtol=1e-5)
    # Positions within an expert are unique among kept choices.
    for gi in range(2):
        slots = {(int(e), int(p)) for e, p, kk in zip(
            np.asarray(r.expert_index[gi]).ravel(), np.asarray(r.position[gi]).ravel(),
            np.asarray(r.kept[gi]).ravel(), strict=True) if kk}
        assert len(slots) == int(np.asarray(r.kept[gi]).sum())


class RouteVariantsTest(chex.TestCase):
    # Each variant (jitted and eager) is checked against the NumPy loop reference, so both
    # halves can fail independently; comparing eager code with itself would prove nothing.
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_and_eager_match_the_numpy_reference(self):
        logits = np.asarray(jax.random.normal(jax.random.key(3), (2, 8, 4)))
        allowed = np.array([True, False, True, True])
        fn = self.variant(lambda x: top_k_route(x, top_k=2, capacity_factor=1.0,
                                                renormalize=True, allowed=jnp.asarray(allowed)))
        r = fn(jnp.asarray(logits))
        chex.assert_shape(r.combine_weights, (2, 8, 2))
        for gi in range(2):
            index, w, kept = reference_route(logits[gi], 2, r.capacity, True,
                                             np.broadcast_to(allowed, (8, 4)))
            np.testing.assert_array_equal(np.asarray(r.kept[gi]), kept)
            np.testing.assert_array_equal(np.where(kept, np.asarray(r.expert_index[gi]), -1),
                                          np.where(kept, index, -1))
            assert_close(r.combine_weights[gi], w)
