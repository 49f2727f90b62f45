"""Hardware-aware local expert selection and model costs: hand cases, monotonicity in
memory, jit equivalence, bad profiles."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ec2moe_jax.config import load_config
from ec2moe_jax.models import MoELM, init_params
from ec2moe_jax.models.costs import model_costs
from ec2moe_jax.profiles import DeviceProfile, device
from ec2moe_jax.routing import expert_rank, top_n_mask
from ec2moe_jax.selection import (
    covered_mass,
    layers_within_budget,
    select_experts,
    select_for_profile,
)
from ec2moe_jax.sharding import unbox

SMALL = model_costs(load_config("small").model)


def test_costs_match_the_parameter_count():
    for kw in ({}, {"model__attention_bias": "all", "model__num_kv_heads": 1,
                    "model__moe__shared_expert_dim": 16, "model__moe__shared_expert_gate": True,
                    "model__moe_layers": (1,), "model__tie_embeddings": True}):
        cfg = load_config("tiny").replace(**kw).model
        params = unbox(init_params(MoELM(cfg), jax.random.key(0)))
        n = sum(x.size for x in jax.tree.leaves(params))
        c = model_costs(cfg)
        assert c.layer_bytes().sum() + c.embed_bytes + c.head_bytes == 4 * n


def test_hand_computed_selection():
    # Each layer first gets its most-used expert (0 and 3); the third slot goes to the
    # largest remaining frequency overall (layer 0, expert 1 at 0.3).
    freq = jnp.array([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7]])
    got = select_experts(freq, 3, min_per_layer=1)
    np.testing.assert_array_equal(got, [[1, 1, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(covered_mass(freq, got), [0.8, 0.7])
    # min_per_layer=2 guarantees two per layer before the global greedy step.
    got = select_experts(freq, 4, min_per_layer=2)
    assert got.sum(-1).tolist() == [2, 2]


def _random_freq(seed, layers=4, experts=8):
    return np.random.default_rng(seed).dirichlet(np.ones(experts) * 0.5, size=layers)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), a=st.floats(0.0, 40.0), b=st.floats(0.0, 40.0),
       end_layers=st.integers(1, 4))
def test_more_memory_never_covers_less(seed, a, b, end_layers):
    freq = _random_freq(seed)
    lo, hi = sorted((a, b))
    pi = device("raspberry-pi-5-8gb")
    small = select_for_profile(pi.with_memory(lo * 2**20), freq, SMALL,
                               num_end_layers=end_layers)
    big = select_for_profile(pi.with_memory(hi * 2**20), freq, SMALL,
                             num_end_layers=end_layers)
    if small.num_end_layers:  # the smaller budget fits, so the larger does too
        assert big.num_end_layers == end_layers
        rows = slice(0, end_layers)
        assert np.all(big.allowed[rows] >= small.allowed[rows])  # a superset
        assert np.all(big.coverage >= small.coverage - 1e-6)
    assert big.resident_bytes <= max(hi * 2**20, 0) or big.num_end_layers == 0
    for sel in (small, big):  # every end MoE layer can still route its top-k
        if sel.num_end_layers:
            assert np.all(sel.allowed[: sel.num_end_layers].sum(-1) >= SMALL.top_k)
        assert np.all(sel.allowed[sel.num_end_layers:])  # the cloud holds every expert


def test_selection_is_jit_equal_and_does_not_recompile_for_new_budgets():
    fn = jax.jit(chex.assert_max_traces(select_experts, n=1), static_argnums=2)
    for seed, slots in ((0, 5), (1, 9), (2, 17)):
        freq = jnp.asarray(_random_freq(seed), jnp.float32)
        np.testing.assert_array_equal(fn(freq, slots, 2), select_experts(freq, slots, 2))


@pytest.mark.parametrize("seed", range(5))
def test_selection_plans_and_pipeline_masks_share_the_top_n_order(seed):
    # One definition of "the top-n experts": selection keeps the top-n of every layer, a
    # pipeline plan's mask is the top-n of its resident counts, and the numpy and jitted
    # masks agree (ties included: frequencies are rounded to make some).
    from ec2moe_jax.config import ModelConfig, MoEConfig
    from ec2moe_jax.pipeline.plans import PipelinePlan

    freq = np.round(_random_freq(seed), 1)
    freq[:, 0] += 1e-9  # no all-zero row
    chosen = np.asarray(select_experts(jnp.asarray(freq, jnp.float32), 13, 2))
    counts = chosen.sum(-1)
    np.testing.assert_array_equal(chosen, top_n_mask(freq, counts))
    np.testing.assert_array_equal(top_n_mask(freq, counts),
                                  np.asarray(jax.jit(top_n_mask)(jnp.asarray(freq), counts)))
    for f in freq:  # by hand: the n largest, lower index first among equals
        order = sorted(range(8), key=lambda e: (-f[e], e))
        assert expert_rank(f).tolist() == [order.index(e) for e in range(8)]
    # Layer 1 dense; layers [0, 4) on the end: MoE rows 0..2 of ``freq`` are end layers.
    cfg = ModelConfig(d_model=32, num_layers=5, num_heads=2, d_ff=64, moe_layers=(0, 2, 3, 4),
                      moe=MoEConfig(num_experts=8, top_k=2, expert_dim=64))
    c = [int(x) for x in counts]
    allowed = PipelinePlan("p", 4, (c[0], 8, c[1], c[2], c[3])).allowed(freq, cfg)
    np.testing.assert_array_equal(allowed[[0, 2, 3]], top_n_mask(freq[:3], counts[:3]))
    assert allowed[[1, 4]].all()  # the dense layer and the cloud layer allow every expert


def test_bad_profiles_get_clear_errors_or_the_cloud_fallback():
    with pytest.raises(ValueError, match="memory_bytes=-1"):
        DeviceProfile("bad", memory_bytes=-1, peak_flops=1e9, mem_bandwidth=1e9)
    with pytest.raises(ValueError, match="peak_flops=0"):
        DeviceProfile("bad", memory_bytes=1e9, peak_flops=0, mem_bandwidth=1e9)
    freq = _random_freq(0)
    tiny = device("raspberry-pi-5-8gb").with_memory(SMALL.expert_bytes * 0.5)
    sel = select_for_profile(tiny, freq, SMALL)
    assert sel.num_end_layers == 0 and "holds 0 experts" in sel.reason
    assert sel.allowed.all() and sel.resident_fraction == 0.0  # everything in the cloud
    with pytest.raises(ValueError, match="no routing statistics"):
        select_for_profile(device("laptop-cpu"), np.zeros((4, 8)), SMALL)
    with pytest.raises(ValueError, match="shape"):
        select_for_profile(device("laptop-cpu"), np.ones((3, 8)), SMALL)


def test_compute_budget_limits_end_layers_and_load_lowers_it():
    pi = device("raspberry-pi-5-8gb")
    per_layer = max(SMALL.layer_flops()[0] / pi.available_flops,
                    SMALL.bytes_touched_per_token()[0] / pi.available_bandwidth)
    assert layers_within_budget(pi, SMALL, 2.5 * per_layer) == 2
    assert layers_within_budget(pi.with_load(0.6), SMALL, 2.5 * per_layer) == 1
    sel = select_for_profile(pi, _random_freq(3), SMALL, seconds_per_token=2.5 * per_layer)
    assert sel.num_end_layers == 2


def test_mixed_precision_counts_first_then_upgrades_the_most_used():
    from ec2moe_jax.selection import mixed_precision

    f = np.array([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    sizes = {2: 1.0, 4: 2.0, 8: 4.0}
    # 8 bytes: every expert in int2, nothing left.
    assert mixed_precision(f, 8.0, sizes).tolist() == [[2] * 4, [2] * 4]
    # 11: all in int2, 3 left: the three most-used (0.4, 0.3, then layer 1's first 0.25)
    # move to int4.
    assert mixed_precision(f, 11.0, sizes).tolist() == [[4, 4, 2, 2], [4, 2, 2, 2]]
    # 5: only 5 fit; each layer's most-used first, then by routing mass.
    assert mixed_precision(f, 5.0, sizes).tolist() == [[2, 2, 0, 0], [2, 2, 2, 0]]
    # Plenty: everything at the top of the ladder. Never more bytes than the budget.
    assert mixed_precision(f, 100.0, sizes).tolist() == [[8] * 4, [8] * 4]
    for budget in (0.0, 3.5, 9.0, 17.0, 23.0):
        bits = mixed_precision(f, budget, sizes)
        assert sum(sizes[b] for b in bits.reshape(-1) if b) <= budget
    with pytest.raises(ValueError, match="positive sizes"):
        mixed_precision(f, 1.0, {})
