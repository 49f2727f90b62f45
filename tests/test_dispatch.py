"""The dispatch implementations (einsum, gather, ragged, the decode-shaped gathered path and
the prefill-shaped looped path) agree with each other and with a per-token loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from ec2moe_jax.config import MoEConfig
from ec2moe_jax.layers import MoEBlock
from ec2moe_jax.layers.moe import uses_gathered, uses_looped
from ec2moe_jax.routing import (
    einsum_moe,
    gather_moe,
    gathered_moe,
    looped_moe,
    ragged_moe,
    top_k_route,
)

G, S, D, F, E, K = 3, 10, 8, 12, 4, 2


def _weights(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(k[0], (E, D, F)) * 0.3, jax.random.normal(k[1], (E, D, F)) * 0.3,
            jax.random.normal(k[2], (E, F, D)) * 0.3, jax.random.normal(k[3], (G, S, D)))


def _expert_fn(wg, wu, wd):
    def fn(xe):
        h = jax.nn.silu(jnp.einsum("end,edf->enf", xe, wg)) * jnp.einsum("end,edf->enf", xe, wu)
        return jnp.einsum("enf,efd->end", h, wd)
    return fn


def loop_reference(x, route, wg, wu, wd):
    """out[g, s] = sum_k w * expert_e(x[g, s]), one token and one expert at a time."""
    x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    idx, w = np.asarray(route.expert_index), np.asarray(route.combine_weights, np.float64)
    out = np.zeros_like(x)
    for g in range(x.shape[0]):
        for s in range(x.shape[1]):
            for j in range(idx.shape[-1]):
                e = idx[g, s, j]
                a = x[g, s] @ wg[e]
                h = a / (1 + np.exp(-a)) * (x[g, s] @ wu[e])
                out[g, s] += w[g, s, j] * (h @ wd[e])
    return out


@pytest.mark.parametrize("factor", [0.5, 1.0, None])
@pytest.mark.parametrize("masked", [False, True])
def test_einsum_and_gather_match_loop_reference(factor, masked):
    wg, wu, wd, x = _weights()
    logits = jax.random.normal(jax.random.key(1), (G, S, E)) * 2
    allowed = jnp.array([True, False, True, True]) if masked else None
    route = top_k_route(logits, top_k=K, capacity_factor=factor, allowed=allowed)
    ref = loop_reference(x, route, wg, wu, wd)
    fn = _expert_fn(wg, wu, wd)
    assert_close(einsum_moe(x, route, fn), ref, atol=1e-4, rtol=1e-4)
    assert_close(gather_moe(x, route, fn), ref, atol=1e-4, rtol=1e-4)
    # Drops (factor 0.5) and masked experts included: a dropped choice weighs 0.
    assert_close(gathered_moe(x, route, wg, wu, wd), ref, atol=1e-4, rtol=1e-4)
    if factor is None:
        assert_close(ragged_moe(x, route, wg, wu, wd), ref, atol=1e-4, rtol=1e-4)
    # The looped path on one buffer per expert, chunks that divide the runs or not.
    per_expert = [tuple(w[e] for e in range(E)) for w in (wg, wu, wd)]
    for chunk in (1, 3, 8):
        assert_close(looped_moe(x, route, *per_expert, chunk=chunk), ref, atol=1e-4, rtol=1e-4)


def test_looped_skips_unchosen_experts_and_dropped_choices():
    # Expert 1 is never chosen and expert 3's weights are NaN but every choice of it is
    # dropped (masked): neither is computed, so the output stays finite and equals the loop.
    wg, wu, wd, x = _weights()
    wg = wg.at[3].set(jnp.nan)
    logits = jax.random.normal(jax.random.key(2), (G, S, E)).at[..., 1].set(-1e9)
    route = top_k_route(logits, top_k=K, capacity_factor=None,
                        allowed=jnp.array([True, True, True, False]))
    assert not bool((route.expert_index == 1).any())
    per_expert = [tuple(w[e] for e in range(E)) for w in (wg, wu, wd)]
    got = looped_moe(x, route, *per_expert, chunk=4)
    assert bool(jnp.isfinite(got).all())
    assert_close(got, loop_reference(x, route, wg.at[3].set(0.0), wu, wd), atol=1e-4, rtol=1e-4)


def test_dropped_tokens_get_zero_output():
    # Capacity 1 with every token preferring expert 0: only the first token is processed.
    wg, wu, wd, x = _weights()
    logits = jnp.tile(jnp.array([10.0, 0.0, 0.0, 0.0]), (1, S, 1))
    route = top_k_route(logits, top_k=1, capacity_factor=0.1)
    assert route.capacity == 1
    y = gather_moe(x[:1], route, _expert_fn(wg, wu, wd))
    assert float(jnp.abs(y[0, 0]).sum()) > 0
    assert float(jnp.abs(y[0, 1:]).sum()) == 0.0


def test_ragged_rejects_capacity_limited_route():
    wg, wu, wd, x = _weights()
    route = top_k_route(jnp.zeros((G, S, E)), top_k=K, capacity_factor=1.0)
    with pytest.raises(ValueError, match="dropless"):
        ragged_moe(x, route, wg, wu, wd)


@pytest.mark.parametrize("train", [False, True])
def test_moe_block_dispatch_implementations_equivalent(train):
    cfg = MoEConfig(num_experts=E, top_k=K, expert_dim=F, capacity_factor=1.0,
                    eval_capacity_factor=None, shared_expert_dim=6, shared_expert_gate=True)
    x = jax.random.normal(jax.random.key(4), (2, 16, D))
    params = MoEBlock(cfg).init(jax.random.key(5), x)
    outs = {}
    for impl in ("einsum", "gather", "ragged"):
        block = MoEBlock(dataclasses.replace(cfg, dispatch=impl))
        outs[impl], _ = block.apply(params, x, deterministic=not train)
    assert_close(outs["gather"], outs["einsum"], atol=1e-5)
    if not train:  # ragged is dropless; in training the others drop at capacity 1.0
        assert_close(outs["ragged"], outs["einsum"], atol=1e-5)


def test_decode_steps_take_the_gathered_path_and_equal_the_dispatch():
    # 16 experts, top-2: a decode step of B = 2 tokens makes 4 choices <= 16 / 2, so the
    # block computes only the chosen experts; the same two tokens at the head of 8-token
    # sequences (32 choices: the configured dispatch) get the same output, since dropless
    # routing is per token. Shared expert included.
    cfg = MoEConfig(num_experts=16, top_k=2, expert_dim=F, capacity_factor=None,
                    eval_capacity_factor=None, shared_expert_dim=6)
    assert uses_gathered(2, 2, 16) and not uses_gathered(16, 2, 16)
    seqs = jax.random.normal(jax.random.key(6), (2, 8, D))
    block = MoEBlock(cfg)
    params = block.init(jax.random.key(7), seqs)
    step, _ = block.apply(params, seqs[:, :1])
    full, _ = block.apply(params, seqs)
    assert_close(step, full[:, :1], atol=1e-5)


def test_group_size_reshapes_tokens_and_rejects_bad_sizes():
    cfg = MoEConfig(num_experts=E, top_k=K, expert_dim=F, group_size=8)
    x = jax.random.normal(jax.random.key(4), (2, 16, D))
    params = MoEBlock(cfg).init(jax.random.key(5), x)
    y, route = MoEBlock(cfg).apply(params, x)
    assert y.shape == x.shape and route.expert_index.shape == (4, 8, K)
    with pytest.raises(ValueError, match="group_size=7"):  # capacity-limited: groups matter
        MoEBlock(dataclasses.replace(cfg, group_size=7)).apply(params, x, deterministic=False)
    # Dropless routing is per token, so an indivisible group size falls back to sequences.
    y7, _ = MoEBlock(dataclasses.replace(cfg, group_size=7)).apply(params, x)
    assert_close(y7, y, atol=1e-6)


@pytest.mark.parametrize("oss", [False, True])
@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_unstacked_experts_equal_stacked(oss, dispatch):
    # One buffer per expert (unstack_experts) changes where the weights live, not the maths:
    # the decode-shaped path (B = 2 tokens, 4 choices of 16 experts) and the capacity-slot
    # dispatch (2 x 8 tokens), plain SwiGLU with a shared expert, and GPT-OSS's biased,
    # clamped experts with a router bias.
    from ec2moe_jax.models import unstack_experts

    extra = dict(expert_bias=True, router_bias=True, expert_act="swiglu_oss") if oss else {}
    cfg = MoEConfig(num_experts=16, top_k=2, expert_dim=F, capacity_factor=None,
                    eval_capacity_factor=None, shared_expert_dim=6, dispatch=dispatch, **extra)
    seqs = jax.random.normal(jax.random.key(8), (2, 8, D))
    block = MoEBlock(cfg)
    params = block.init(jax.random.key(9), seqs)
    # Non-zero biases, so a bias read from the wrong expert shows.
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: (a + 0.1 * jax.random.normal(jax.random.key(len(path)), a.shape)
                         if "b_" in jax.tree_util.keystr(path) else a), params)
    split = {"params": unstack_experts(params["params"])}
    assert "w_gate" not in split["params"] and len(split["params"]["experts"]["w_gate"]) == 16
    assert unstack_experts(split["params"]).keys() == split["params"].keys()  # idempotent
    # Decode-shaped (2 tokens), looped (2 x 8 tokens: 32 choices <= 16 per expert) and the
    # capacity-slot dispatch (2 x 160 tokens: 640 choices).
    long = jax.random.normal(jax.random.key(10), (2, 160, D))
    for x in (seqs[:, :1], seqs, long):
        n = x.shape[0] * x.shape[1]
        assert uses_gathered(n, 2, 16) == (x.shape[1] == 1)
        assert uses_looped(n, 2, 16) == (x.shape[1] <= 8)
        want, _ = block.apply(params, x)
        got, _ = block.apply(split, x)
        assert_close(got, want, atol=1e-5)
