"""Autoregressive generation with the KV cache (greedy or temperature sampling).

Shape legend: B batch, P prompt length, Pb padded prompt length, N new tokens, M cache length,
V vocab.

The cache is sized to the request (:func:`~.lm.cache_bucket`: prompt + new tokens rounded up
to a power of two from 64), the prompt is right-padded to a power of two from 16, and the
decoding loop is one ``lax.fori_loop`` on the device with a traced trip count (donated cache,
sampling on device, no host round trip per token). Requests whose prompt and total length fall
in the same buckets therefore reuse one compiled program. Streaming (``on_token``) keeps a
per-token path: one jitted step per token, each handed to the caller as it exists.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.config import ModelConfig
from ec2moe_jax.models.lm import (
    MoELM,
    cache_bucket,
    cache_length,
    cache_positions,
    init_cache,
    set_cache_positions,
)

# XLA:CPU's copy insertion, without region analysis, could not prove that a decode step
# reads each layer's KV cache before writing it in place, and copied every layer's cache per
# step (16 copies of [1, 8, 128, 64] per step of a 4-layer OLMoE-shaped model, counted in
# its compiled HLO; tests/test_decode.py checks there are none).
DECODE_COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def decode_jit(fn: Callable, **kwargs) -> Callable:
    """``jax.jit(fn, **kwargs)`` with :data:`DECODE_COMPILER_OPTIONS` on a CPU backend: the
    jit for functions that update a KV cache (prefill, decode steps and loops)."""
    if jax.default_backend() == "cpu":
        kwargs.setdefault("compiler_options", DECODE_COMPILER_OPTIONS)
    return jax.jit(fn, **kwargs)


PROMPT_BUCKET_MIN = 16  # smallest padded prompt: prefill of <= 16 tokens compiles once
CACHE_BUCKET_MIN = 64  # smallest KV cache: every request of <= 64 positions shares it


def request_cache_length(cfg: ModelConfig, prompt_len: int, new_tokens: int) -> int:
    """KV cache positions of a request of ``prompt_len`` + ``new_tokens`` tokens: the bucket
    (:func:`~.lm.cache_bucket`, from :data:`CACHE_BUCKET_MIN`) every generation path sizes
    its caches to, so requests of similar lengths share one compiled program.

    Raises:
      ValueError: the request exceeds ``cfg.max_seq_len``.
    """
    return cache_bucket(prompt_len + new_tokens, cfg.max_seq_len, CACHE_BUCKET_MIN)


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float) -> jax.Array:
    """<float32>[B, V] -> <int32>[B]; ``temperature == 0`` is greedy."""
    if temperature < 0:
        raise ValueError(f"{temperature=} must be >= 0 (0 = greedy)")
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


def last_valid(x: jax.Array, lengths: jax.Array) -> jax.Array:
    """[B, T, ...] -> [B, ...]: each row's last valid position ``lengths[b] - 1`` (position 0
    for a row of length 0, an idle row whose result the caller ignores)."""
    at = jnp.maximum(lengths.astype(jnp.int32) - 1, 0)
    return jnp.take_along_axis(x, at.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def decode_forward(model: MoELM, params, cache, tokens: jax.Array, lengths: jax.Array):
    """One cached forward pass of right-padded ``tokens`` <int32>[B, T] with ``lengths``
    <int32>[B] valid tokens per row (0: the row idles and keeps its position).

    Returns:
      ``(cache, logits)``: the cache with each row advanced by its length, and <float32>[B, V]
      logits at each row's last valid position (the head runs on those B positions only).
    """
    v = {"params": params, "cache": cache}
    start = cache_positions(cache)
    x = model.apply(v, tokens, method="embed")
    (x, _), state = model.apply(v, x, decode=True, method="layers", mutable=["cache"])
    cache = set_cache_positions(state["cache"], start + lengths)
    logits = model.apply({"params": params}, last_valid(x, lengths)[:, None], method="head")
    return cache, logits[:, 0]


class Decoder(NamedTuple):
    """Jitted decoding functions of one model and temperature (see :func:`make_decoder`)."""

    prefill: Callable  # (params, cache, tokens [B, Pb], lengths [B], rng) -> (cache, tok, logits)
    step: Callable  # (params, cache, tok [B], rng) -> (cache, tok [B], logits [B, V])
    loop: Callable  # (params, cache, tok [B], rng, n) -> (cache, out <int32>[B, M])


@functools.lru_cache(maxsize=16)
def _decoder(cfg: ModelConfig, temperature: float) -> Decoder:
    model = MoELM(cfg)

    def run(params, cache, tokens, lengths, rng):
        cache, logits = decode_forward(model, params, cache, tokens, lengths)
        return cache, sample_token(logits, rng, temperature), logits

    def step(params, cache, tok, rng):
        return run(params, cache, tok[:, None], jnp.ones_like(tok), rng)

    def loop(params, cache, tok, rng, n):
        out = jnp.zeros((tok.shape[0], cache_length(cache)), jnp.int32).at[:, 0].set(tok)

        def body(i, carry):  # the same key sequence as the streaming path
            cache, tok, rng, out = carry
            rng, sub = jax.random.split(rng)
            cache, tok, _ = step(params, cache, tok, sub)
            return cache, tok, rng, out.at[:, i].set(tok)

        cache, _, _, out = jax.lax.fori_loop(1, n, body, (cache, tok, rng, out))
        return cache, out

    return Decoder(decode_jit(run, donate_argnums=1), decode_jit(step, donate_argnums=1),
                   decode_jit(loop, donate_argnums=1))


def make_decoder(model: MoELM, temperature: float = 0.0) -> Decoder:
    """Jitted ``prefill(params, cache, tokens [B, Pb], lengths [B], rng)``, ``step(params,
    cache, tok [B], rng)`` (each -> ``(cache, next_token [B], logits [B, V])``) and
    ``loop(params, cache, first [B], rng, n) -> (cache, out <int32>[B, M])``, which decodes
    ``n - 1`` tokens after ``first`` on the device (``n`` traced: one program for every
    count; ``out[:, :n]`` holds ``first`` and the new tokens). All three donate the cache.
    Built once per (config, temperature) and reused, so a second request compiles nothing.
    """
    return _decoder(model.cfg, float(temperature))


def _check_request(model: MoELM, prompt: np.ndarray, max_new_tokens: int) -> None:
    limit, vocab = model.cfg.max_seq_len, model.cfg.vocab_size
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, time] with at least one token, got shape "
                         f"{prompt.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"{max_new_tokens=} must be >= 1")
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise ValueError(f"prompt token ids must lie in [0, vocab_size={vocab})")
    if prompt.shape[1] + max_new_tokens > limit:
        raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} "
                         f"exceeds the model's max_seq_len={limit}; shorten one of them")


def generate(
    model: MoELM,
    params,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
    on_token: Callable[[jax.Array], None] | None = None,
    cache_dtype=None,
) -> jax.Array:
    """Generates ``max_new_tokens`` after ``prompt`` (<int32>[B, P]) -> <int32>[B, N].

    The KV cache holds ``cache_bucket(P + N)`` positions (not ``max_seq_len``), in
    ``cache_dtype`` (default the model's activation dtype). Without ``on_token`` the whole
    loop runs on the device; ``on_token`` receives each new <int32>[B] token as soon as it
    exists (streaming, one host round trip per token). Both paths draw the same keys.
    For bfloat16 weights as well, pass ``cast_params(params, "bfloat16")``
    (:func:`~.lm.cast_params`) with a bfloat16 model config. Parameters split once by
    :func:`~ec2moe_jax.layers.moe.unstack_experts` decode faster on a CPU (no copy of the
    chosen experts per token); stacked ones give the same tokens.

    Raises:
      ValueError: an empty or non-[B, P] prompt, ids outside the vocabulary,
        ``max_new_tokens < 1``, or P + N beyond ``max_seq_len``.
    """
    prompt = np.asarray(prompt)
    _check_request(model, prompt, max_new_tokens)
    b, p = prompt.shape
    limit = model.cfg.max_seq_len
    m = request_cache_length(model.cfg, p, max_new_tokens)
    padded = np.zeros((b, cache_bucket(p, limit, PROMPT_BUCKET_MIN)), np.int32)
    padded[:, :p] = prompt
    rng = jax.random.key(0) if rng is None else rng
    dec = make_decoder(model, temperature)
    rng, sub = jax.random.split(rng)
    cache, tok, _ = dec.prefill(params, init_cache(model, b, m, cache_dtype), padded,
                                np.full((b,), p, np.int32), sub)
    if on_token is None:
        _, out = dec.loop(params, cache, tok, rng, np.int32(max_new_tokens))
        # Sliced on the host: an eager slice (or jnp.asarray of a strided view) would
        # compile once per N.
        return jax.device_put(np.ascontiguousarray(np.asarray(out)[:, :max_new_tokens]))
    out = [tok]
    on_token(tok)
    for _ in range(max_new_tokens - 1):
        rng, sub = jax.random.split(rng)
        cache, tok, _ = dec.step(params, cache, tok, sub)
        out.append(tok)
        on_token(tok)
    return jax.device_put(np.stack([np.asarray(t) for t in out], axis=1))


def generate_recompute(model: MoELM, params, prompt: jax.Array, max_new_tokens: int) -> jax.Array:
    """Greedy generation by full recomputation (no cache): the reference for tests.

    The sequence lives in a fixed [B, P + N] buffer (causal attention ignores what follows a
    position), so the forward pass compiles once.
    """
    b, p = prompt.shape
    buf = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompt)
    forward = jax.jit(lambda params, seq: model.apply({"params": params}, seq))
    for i in range(max_new_tokens):
        logits = forward(params, buf)
        buf = buf.at[:, p + i].set(jnp.argmax(logits[:, p + i - 1], -1).astype(jnp.int32))
    return buf[:, p:]
