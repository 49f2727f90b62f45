"""Fast decoding: the KV cache sized to the request (a few bucket sizes), the on-device loop,
and compilation reused across requests of similar lengths. Tiny config with max_seq_len 256
(so three cache buckets exist: 64, 128, 256), random parameters whose attention weights are
scaled up so that attention is sharp (at init it is nearly uniform and the tokens would not
notice a wrong position or mask)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from ec2moe_jax.config import load_config
from ec2moe_jax.models import (
    MoELM,
    cache_bucket,
    cache_shapes,
    generate,
    generate_recompute,
    init_cache,
    init_params,
    make_decoder,
)
from ec2moe_jax.pipeline import fixed_times
from ec2moe_jax.pipeline import generate as pipeline_generate
from ec2moe_jax.sharding import unbox

_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event) if "backend_compile" in event
    else None)


def _sharpen(params, scale=25.0):
    """Scales every query and key projection, so attention scores span several units."""
    def one(path, x):
        name = getattr(path[-1], "key", "")
        return x * scale if name in ("wq", "wk") else x
    return jax.tree_util.tree_map_with_path(one, params)


@pytest.fixture(scope="module")
def world():
    cfg = dataclasses.replace(load_config("tiny").model, max_seq_len=256).validate()
    model = MoELM(cfg)
    return model, _sharpen(unbox(init_params(model, jax.random.key(0))))


def test_cache_buckets_are_powers_of_two_from_64_capped_at_max_seq_len():
    assert [cache_bucket(n, 256) for n in (1, 64, 65, 128, 129, 256)] == [64, 64, 128, 128,
                                                                          256, 256]
    assert cache_bucket(100, 100) == 100 and cache_bucket(3, 4096, smallest=16) == 16
    with pytest.raises(ValueError, match="max_seq_len=256"):
        cache_bucket(257, 256)


def test_cache_shapes_are_what_the_model_writes(world):
    # The cache built from the config (no tracing) has the very structure, shapes and dtypes
    # a decode pass returns, so a step never re-creates a variable at max_seq_len.
    model, params = world
    cache = init_cache(model, 2, 64)
    _, state = model.apply({"params": params, "cache": cache}, jnp.zeros((2, 3), jnp.int32),
                           decode=True, mutable=["cache"])
    got = jax.tree.map(lambda x: (x.shape, x.dtype), state["cache"])
    want = jax.tree.map(lambda x: (x.shape, x.dtype), cache_shapes(model.cfg, 2, 64))
    assert got == want
    np.testing.assert_array_equal(state["cache"]["layer_0"]["attn"]["cache_index"], [3, 3])


@pytest.mark.parametrize("prompt_len, new", [(5, 12), (40, 30), (100, 30)])
def test_cached_generation_equals_recomputation_in_every_bucket(world, prompt_len, new):
    # Caches of 64, 128 and 256 positions (prompts right-padded to 16, 64 and 128): greedy
    # decoding on the device equals full recomputation, token for token, and the logits of
    # the prefill and of every step (the per-token path) equal the full forward's.
    model, params = world
    prompt = np.asarray(jax.random.randint(jax.random.key(prompt_len), (1, prompt_len), 0,
                                           256), np.int32)
    tokens = np.asarray(generate(model, params, prompt, new))
    np.testing.assert_array_equal(tokens, generate_recompute(model, params, prompt, new))
    dec, key = make_decoder(model), jax.random.key(0)
    padded = np.zeros((1, cache_bucket(prompt_len, 256, 16)), np.int32)
    padded[:, :prompt_len] = prompt
    cache = init_cache(model, 1, cache_bucket(prompt_len + new, 256))
    cache, _, first = dec.prefill(params, cache, padded, np.array([prompt_len]), key)
    logits = [first]
    for t in tokens[0, :-1]:
        cache, _, step = dec.step(params, cache, np.array([t], np.int32), key)
        logits.append(step)
    seq = np.concatenate([prompt, tokens[:, :-1]], axis=1)
    full = model.apply({"params": params}, seq)[0, prompt_len - 1:]
    assert_close(np.concatenate(logits), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_per_expert_buffers_and_grouped_queries_decode_like_recomputation(world, kv_heads):
    # One buffer per expert (unstack_experts): a 40-token prompt's 80 choices over 8 experts
    # take the looped prefill path, each step the decode-shaped switch; with 1 key/value
    # head for 2 query heads the grouped queries attend to the cache as stored. Tokens equal
    # full recomputation at batch 2.
    from ec2moe_jax.layers.moe import uses_looped
    from ec2moe_jax.models import unstack_experts

    model, params = world
    if kv_heads != model.cfg.kv_heads:
        model = MoELM(dataclasses.replace(model.cfg, num_kv_heads=kv_heads).validate())
        params = _sharpen(unbox(init_params(model, jax.random.key(1))))
    assert uses_looped(40, 2, 8)
    prompt = np.asarray(jax.random.randint(jax.random.key(5), (2, 40), 0, 256), np.int32)
    tokens = np.asarray(generate(model, unstack_experts(params), prompt, 20))
    np.testing.assert_array_equal(tokens, generate_recompute(model, params, prompt, 20))


@pytest.mark.parametrize("batch", [1, 4])
def test_a_decode_step_writes_the_cache_in_place(world, batch):
    # The compiled step holds no copy of any layer's [B, Hk, M, Dh] cache: each step reads
    # the cache before writing the new keys/values into it (models.DECODE_COMPILER_OPTIONS).
    model, params = world
    cache = init_cache(model, batch, 64)
    hlo = make_decoder(model).step.lower(params, cache, np.zeros((batch,), np.int32),
                                         jax.random.key(0)).compile().as_text()
    kv = cache["layer_0"]["attn"]["cached_key"].shape
    shape = "f32[" + ",".join(map(str, kv)) + "]"
    copies = [line for line in hlo.splitlines() if shape in line and " copy(" in line]
    assert not copies, copies[:3]


def test_a_second_request_of_a_similar_length_compiles_nothing(world, tiny_pipeline):
    # models.generate: prompts of 5 and 9 tokens (one 16-token prompt bucket), 10 and 20 new
    # tokens (one 64-position cache): the second request runs the first one's programs.
    model, params = world
    first = jax.random.randint(jax.random.key(1), (2, 5), 0, 256)
    second = np.asarray(jax.random.randint(jax.random.key(2), (2, 9), 0, 256))
    generate(model, params, first, 10)
    before = len(_COMPILES)
    generate(model, params, second, 20)
    assert len(_COMPILES) == before, _COMPILES[before:]
    # The split pipeline (both engines at split 1), likewise: 4 then 6 prompt tokens.
    stages = tiny_pipeline["stages"][1]
    prompts = np.asarray(jax.random.randint(jax.random.key(3), (2, 10), 0, 256), np.int32)
    pipeline_generate(stages, prompts[:, :4], 3, channel=_channel(),
                      timer=fixed_times({}), micro_batch=2)
    before = len(_COMPILES)
    pipeline_generate(stages, prompts[:, :6], 5, channel=_channel(),
                      timer=fixed_times({}), micro_batch=2)
    assert len(_COMPILES) == before, _COMPILES[before:]


def _channel():
    from ec2moe_jax.pipeline import Channel
    from ec2moe_jax.profiles import LinkProfile

    return Channel.from_profile(LinkProfile("test", bandwidth_bps=1e6, rtt_s=0.01))
