"""Model features the imported families need, on hand-computable cases: sliding-window
attention (with and without the KV cache), GPT-OSS's clamped biased experts on every
dispatch path."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.config import ModelConfig, MoEConfig
from ec2moe_jax.layers.attention import Attention
from ec2moe_jax.layers.moe import MoEBlock, oss_swiglu, uses_gathered
from ec2moe_jax.models import MoELM, generate, generate_recompute, init_params, load_hf
from ec2moe_jax.sharding import unbox

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "hf")

CFG = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                  max_seq_len=32, moe=MoEConfig(num_experts=4, top_k=2, expert_dim=8,
                                                capacity_factor=None,
                                                eval_capacity_factor=None))


def test_window_of_one_attends_to_the_token_itself():
    # With W = 1 each query sees only its own key: softmax over one score is 1, so the
    # output is wo(v(x_t)) token by token, whatever q and k are.
    attn = Attention(CFG, window=1)
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    p = unbox(attn.init(jax.random.key(1), x, pos)["params"])
    v = jnp.einsum("btd,dhk->bthk", x, p["wv"])
    want = jnp.einsum("bthk,hkd->btd", v, p["wo"])
    np.testing.assert_allclose(attn.apply({"params": p}, x, pos), want, atol=1e-5)
    full = Attention(CFG).apply({"params": p}, x, pos)
    assert float(jnp.abs(full - want)[:, 1:].max()) > 1e-2  # the window changed something


def test_cached_generation_past_the_window_equals_recomputation():
    # Alternating sliding/full layers (GPT-OSS's pattern), window 3, 14 positions; one row,
    # so decode steps take the decode-shaped MoE path (uses_gathered).
    cfg = dataclasses.replace(CFG, sliding_window=3, sliding_layers=(0,))
    model = MoELM(cfg)
    params = unbox(init_params(model, jax.random.key(2)))
    prompt = jnp.asarray([[3, 1, 4, 1]], jnp.int32)
    assert uses_gathered(1, cfg.moe.top_k, cfg.moe.num_experts)
    np.testing.assert_array_equal(generate(model, params, prompt, 10),
                                  generate_recompute(model, params, prompt, 10))


def test_gpt_oss_cached_generation_on_the_decode_path_equals_recomputation():
    # The GPT-OSS fixture: sinks, a window of 5 on layer 0, biased clamped experts; one row
    # so each decode step runs the decode-shaped (gathered) expert path.
    model, params = load_hf(os.path.join(FIX, "gpt_oss"))
    assert uses_gathered(1, model.cfg.moe.top_k, model.cfg.moe.num_experts)
    prompt = np.load(os.path.join(FIX, "gpt_oss", "reference.npz"))["token_ids"][:1, :4]
    np.testing.assert_array_equal(generate(model, params, prompt, 8),
                                  generate_recompute(model, params, prompt, 8))


def test_biased_clamped_experts_agree_across_dispatch_paths():
    # One token alone takes the gathered path; inside 16 tokens, the einsum and gather
    # dispatches. Routing is per token (dropless), so that token's output must agree.
    cfg = MoEConfig(num_experts=4, top_k=2, expert_dim=8, capacity_factor=None,
                    eval_capacity_factor=None, router_bias=True, expert_bias=True,
                    expert_act="swiglu_oss", swiglu_limit=0.5)
    x = jax.random.normal(jax.random.key(3), (1, 16, 16)) * 3
    block = MoEBlock(cfg)
    p = unbox(block.init(jax.random.key(4), x)["params"])
    p = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(5), a.shape), p)
    alone, _ = block.apply({"params": p}, x[:, 5:6])
    for dispatch in ("einsum", "gather"):
        full, _ = MoEBlock(dataclasses.replace(cfg, dispatch=dispatch)).apply({"params": p}, x)
        np.testing.assert_allclose(alone[0, 0], full[0, 5], atol=1e-5)


def test_oss_swiglu_by_hand():
    # g = [1, 9] clamps to [1, 7]; u = [-9, 0.5] clamps to [-7, 0.5]; W_d = identity.
    x = jnp.ones((1, 1))
    out = oss_swiglu(x, jnp.array([[1.0, 9.0]]), jnp.array([[-9.0, 0.5]]), jnp.eye(2),
                     jnp.zeros(2), jnp.zeros(2), jnp.array([0.0, 1.0]), alpha=1.0, limit=7.0)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    want = [1 * sig(1) * (-7 + 1), 7 * sig(7) * (0.5 + 1) + 1.0]
    np.testing.assert_allclose(out[0], want, rtol=1e-6)
