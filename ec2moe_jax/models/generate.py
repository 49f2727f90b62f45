"""Autoregressive generation with the KV cache (greedy or temperature sampling).

Shape legend: B batch, P prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ec2moe_jax.models.lm import MoELM, init_cache


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float) -> jax.Array:
    """<float32>[B, V] -> <int32>[B]; ``temperature == 0`` is greedy."""
    if temperature < 0:
        raise ValueError(f"{temperature=} must be >= 0 (0 = greedy)")
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


def make_decoder(model: MoELM, temperature: float = 0.0):
    """Jitted ``prefill(params, cache, prompt, rng)`` and ``step(params, cache, tok, rng)``.

    Both return ``(cache, next_token [B], logits [B, V])``; the temperature is closed over.
    """

    def run(params, cache, tokens, rng):
        logits, mutated = model.apply({"params": params, "cache": cache}, tokens, decode=True,
                                      mutable=["cache"])
        last = logits[:, -1]
        return mutated["cache"], sample_token(last, rng, temperature), last

    prefill = jax.jit(run)
    step = jax.jit(lambda p, c, tok, rng: run(p, c, tok[:, None], rng), donate_argnums=1)
    return prefill, step


def generate(
    model: MoELM,
    params,
    prompt: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
    on_token: Callable[[jax.Array], None] | None = None,
) -> jax.Array:
    """Generates ``max_new_tokens`` after ``prompt`` (<int32>[B, P]) -> <int32>[B, N].

    ``on_token`` receives each new <int32>[B] token as soon as it exists (streaming).
    """
    b, p = prompt.shape
    limit = model.cfg.max_seq_len
    if p < 1:
        raise ValueError("prompt must hold at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"{max_new_tokens=} must be >= 1")
    vocab = model.cfg.vocab_size
    if not bool(jnp.all((prompt >= 0) & (prompt < vocab))):
        raise ValueError(f"prompt token ids must lie in [0, vocab_size={vocab})")
    if p + max_new_tokens > limit:
        raise ValueError(f"prompt length {p} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's max_seq_len={limit}; shorten one of them")
    rng = jax.random.key(0) if rng is None else rng
    prefill, step = make_decoder(model, temperature)
    cache = init_cache(model, params, b)
    rng, sub = jax.random.split(rng)
    cache, tok, _ = prefill(params, cache, jnp.asarray(prompt, jnp.int32), sub)
    out = [tok]
    if on_token is not None:
        on_token(tok)
    for _ in range(max_new_tokens - 1):
        rng, sub = jax.random.split(rng)
        cache, tok, _ = step(params, cache, tok, sub)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
    return jnp.stack(out, axis=1)


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
