"""The LM: shapes, KV-cache decoding, generation, masks through the model, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from ec2moe_jax.config import load_config
from ec2moe_jax.models import MoELM, generate, generate_recompute, init_cache, init_params
from ec2moe_jax.sharding import unbox


def _model(**model_overrides):
    cfg = load_config("tiny").model
    moe = model_overrides.pop("moe", {})
    cfg = dataclasses.replace(cfg, **model_overrides, moe=dataclasses.replace(cfg.moe, **moe))
    model = MoELM(cfg.validate())
    return model, unbox(init_params(model, jax.random.key(0)))


def _tokens(b=2, t=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, 256)


def test_forward_shapes_and_aux():
    model, params = _model()
    logits, aux = model.apply({"params": params}, _tokens(), return_aux=True)
    assert logits.shape == (2, 12, 256) and logits.dtype == jnp.float32
    assert aux["expert_counts"].shape == (2, 8)  # [MoE layers, E]
    # Every token makes K=2 choices in each of the 2 layers (no mask): 2 * 12 * 2 per layer.
    np.testing.assert_array_equal(aux["expert_counts"].sum(-1), [48, 48])
    assert float(aux["aux_loss"]) > 0 and np.isfinite(float(aux["z_loss"]))


@pytest.mark.parametrize("overrides", [
    {},
    {"num_kv_heads": 1, "moe_layers": (1,)},  # grouped-query attention, first layer dense
    {"moe": {"shared_expert_dim": 16, "shared_expert_gate": True, "renormalize": False}},
])
def test_kv_cache_decoding_equals_full_forward(overrides):
    model, params = _model(**overrides)
    tokens = _tokens(t=10)
    full = model.apply({"params": params}, tokens)
    cache = init_cache(model, 2)
    prefix, state = model.apply({"params": params, "cache": cache}, tokens[:, :6], decode=True,
                                mutable=["cache"])
    steps = [prefix]
    for i in range(6, 10):
        out, state = model.apply({"params": params, "cache": state["cache"]}, tokens[:, i:i + 1],
                                 decode=True, mutable=["cache"])
        steps.append(out)
    assert_close(jnp.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4)


def test_greedy_generation_with_cache_equals_recomputation():
    model, params = _model()
    prompt = _tokens(t=5)
    np.testing.assert_array_equal(generate(model, params, prompt, 12),
                                  generate_recompute(model, params, prompt, 12))


def test_sampling_is_seeded_and_streams():
    model, params = _model()
    prompt = _tokens(t=3)
    seen = []
    a = generate(model, params, prompt, 6, temperature=1.0, rng=jax.random.key(5),
                 on_token=seen.append)
    b = generate(model, params, prompt, 6, temperature=1.0, rng=jax.random.key(5))
    np.testing.assert_array_equal(a, b)
    assert len(seen) == 6
    np.testing.assert_array_equal(jnp.stack(seen, 1), a)


def test_allowed_mask_through_the_model():
    model, params = _model()
    allowed = jnp.zeros((2, 8), bool).at[:, :3].set(True)
    _, aux = model.apply({"params": params}, _tokens(), allowed=allowed, return_aux=True)
    assert int(aux["expert_counts"][:, 3:].sum()) == 0
    assert int(aux["expert_counts"][:, :3].sum()) == 2 * 2 * 12 * 2


def test_stage_methods_compose_to_the_full_model():
    model, params = _model()
    tokens = _tokens()
    v = {"params": params}
    h = model.apply(v, tokens, method="embed")
    h, _ = model.apply(v, h, 0, 1, method="layers")
    h, _ = model.apply(v, h, 1, 2, method="layers")
    assert_close(model.apply(v, h, method="head"), model.apply(v, tokens))


def test_group_size_does_not_break_decoding():
    model, params = _model(moe={"group_size": 4})  # 2 x 1 decode tokens: not divisible
    prompt = _tokens(t=4)
    np.testing.assert_array_equal(generate(model, params, prompt, 5),
                                  generate_recompute(model, params, prompt, 5))


def test_bad_input_is_named():
    model, params = _model()
    with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
        model.apply({"params": params}, _tokens(t=65))
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(model, params, _tokens(t=60), 10)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(model, params, _tokens(t=3), 0)
    with pytest.raises(ValueError, match="vocab_size=256"):
        generate(model, params, jnp.array([[1, 300]]), 2)
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        model.apply({"params": params}, jnp.zeros((4,), jnp.int32))
