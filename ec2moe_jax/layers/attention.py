"""Causal multi-head (grouped-query) attention with RoPE and a KV cache for decoding.

Shape legend: B batch, T new tokens, S attended positions, M cache length (sized to the request),
D model, H query heads, Hk key/value heads, Dh head dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ec2moe_jax.config import ModelConfig
from ec2moe_jax.layers.basic import RMSNorm, default_init, dense, param_with_axes, rope


class Attention(nn.Module):
    """Self-attention; with ``decode=True`` it appends to and attends over the 'cache'
    collection: ``cached_key``/``cached_value`` [B, Hk, M, Dh] and ``cache_index`` <int32>[B],
    each row's write position (head-major: a decode step multiplies against the cache as
    stored; the [B, M, Hk, Dh] order cost a transposed copy of the whole cache per layer and
    step, half of a batch-8 decode step of the small model on XLA:CPU, measured here). Row
    b's new tokens take positions ``cache_index[b] + [0, T)`` (RoPE and the causal mask use
    them), its keys/values land in those slots, and its index advances by T. Slot j of a row
    holds position j, so a query at position p attends to slots ``[0, p]``: rows at different
    lengths share one cache, and slots past a row's position (never written, or stale from an
    earlier occupant of the row) are masked.

    M is the length of the cache passed in (:func:`ec2moe_jax.models.init_cache` sizes it to
    the request); a cache this module creates itself has ``max_seq_len``. Writing past M
    cannot be checked inside jit (``dynamic_update_slice`` clamps the start, overwriting the
    row's last slots), so callers must guard it, as :func:`ec2moe_jax.models.generate` does.
    """

    cfg: ModelConfig
    window: int | None = None  # sliding window W (keys (p - W, p]); None = full causal

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, decode: bool = False) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        b, t, d = x.shape
        h, hk, dh = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head

        def proj(name, heads):
            w = self.param(name, param_with_axes(default_init, ("embed", "heads", "head_dim")),
                           (d, heads, dh))
            y = dense(x.astype(dtype), w.astype(dtype))
            if cfg.attention_bias != "none":
                bias = self.param("b" + name[1:], param_with_axes(
                    nn.initializers.zeros, ("heads", "head_dim")), (heads, dh))
                y = y + bias.astype(dtype)
            if cfg.qk_norm == "full" and name in ("wq", "wk"):  # over the whole projection
                norm = RMSNorm(cfg.norm_eps, "heads", name=f"{name[1]}_norm")
                y = norm(y.reshape(b, t, heads * dh)).reshape(b, t, heads, dh)
            elif cfg.qk_norm == "head" and name in ("wq", "wk"):  # per head, shared weights
                y = RMSNorm(cfg.norm_eps, "head_dim", name=f"{name[1]}_norm")(y)
            return y

        if decode:
            # The cache knows where each row's chunk goes; positions follow from its index.
            idx = self.variable("cache", "cache_index", jnp.zeros, (b,), jnp.int32)
            positions = idx.value[:, None] + jnp.arange(t, dtype=jnp.int32)
        yarn = None if cfg.rope_scaling == "none" else (
            cfg.rope_factor, cfg.rope_original_max_len or cfg.max_seq_len, cfg.rope_beta_fast,
            cfg.rope_beta_slow, cfg.rope_truncate)
        q = rope(proj("wq", h), positions, cfg.rope_theta, yarn)
        k = rope(proj("wk", hk), positions, cfg.rope_theta, yarn)
        v = proj("wv", hk)
        # [B, H, T, Dh] layout: plain batched matmuls are the fastest form on XLA:CPU. The
        # cache is stored head-major, so a decode step reads it as stored.
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
        # Grouped-query attention: the h // hk queries of a key/value head attend as one
        # [B, Hk, G * T, Dh] block, so keys and values are read as stored (repeating them
        # copied the whole cache per layer and step).
        g = h // hk
        q = q.reshape(b, hk, g * t, dh)
        scale = dh**-0.5 if cfg.attention_multiplier is None else cfg.attention_multiplier

        def scores_over(keys, k_pos, visible):
            """q against keys [B, Hk, S, Dh] at positions k_pos [B|1, S] -> masked
            <float32>[B, H, T, S]; ``visible(k_pos [.., 1, S], q_pos [B, T, 1])`` -> bool."""
            # Contracting both on Dh: no transposed copy of the keys.
            sc = jnp.einsum("bkqd,bksd->bkqs", q, keys).astype(jnp.float32) * scale
            sc = sc.reshape(b, h, t, -1)
            mask = visible(k_pos[:, None, :], positions[:, :, None])  # [B, T, S]
            if self.window is not None:
                # Sliding window as transformers' sliding_window_overlay: kv > q - W. The
                # cache keeps every position (slot j = position j), so cached decoding
                # masks the same keys as a recomputation.
                mask &= k_pos[:, None, :] > positions[:, :, None] - self.window
            return jnp.where(mask[:, None], sc, jnp.finfo(jnp.float32).min)

        def causal(kp, qp):
            return kp <= qp

        if decode:
            # The new tokens attend to the cache as it was (slot j holds position j; slots
            # at or past a row's index are unwritten or stale, so masked) and, causally, to
            # each other; then their keys/values are written. Reading the cache before the
            # write lets XLA update it in place (with models.DECODE_COMPILER_OPTIONS):
            # attending over the written cache kept a copy of each layer's cache per batch-1
            # step (measured on XLA:CPU).
            ck, cv = self._cache(b, hk, dh, k.dtype)
            k, v = k.astype(ck.value.dtype), v.astype(cv.value.dtype)
            slots = jnp.arange(ck.value.shape[2], dtype=jnp.int32)[None]
            old_len = idx.value[:, None, None]
            scores = jnp.concatenate([
                scores_over(ck.value, slots, lambda kp, qp: kp < old_len),
                scores_over(k, positions, causal)], axis=-1)
            values = (cv.value, v)
        else:
            scores, values = scores_over(k, positions, causal), (v,)
        if cfg.attention_sinks:
            # GPT-OSS: a learned logit per head joins every softmax and takes its share of
            # the probability; its column is then dropped (the sink attends to nothing).
            sinks = self.param("sinks", param_with_axes(nn.initializers.zeros, ("heads",)),
                               (h,)).astype(jnp.float32)
            sink = jnp.broadcast_to(sinks[None, :, None, None], (*scores.shape[:3], 1))
            probs = jax.nn.softmax(jnp.concatenate([scores, sink], -1), axis=-1)[..., :-1]
            probs = probs.astype(dtype)
        else:
            probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        probs = probs.reshape(b, hk, g * t, -1)
        out, at = 0, 0
        for vals in values:  # [B, Hk, S, Dh] each: the cache, then the new tokens
            s_len = vals.shape[2]
            out = out + (probs[..., at:at + s_len] @ vals).astype(dtype)
            at += s_len
        if decode:
            self._write(ck, cv, k, v, idx)
        out = out.reshape(b, h, t, dh)
        out = out.transpose(0, 2, 1, 3)  # [B, T, H, Dh]
        wo = self.param("wo", param_with_axes(default_init, ("heads", "head_dim", "embed")),
                        (h, dh, d))
        y = dense(out.reshape(b, t, h * dh), wo.astype(dtype).reshape(h * dh, d))
        if cfg.attention_bias == "all":
            y = y + self.param("bo", param_with_axes(nn.initializers.zeros, ("embed",)),
                               (d,)).astype(dtype)
        return y

    def _cache(self, b, hk, dh, dtype):
        """The 'cache' variables ``cached_key``/``cached_value`` [B, Hk, M, Dh]."""
        m = self.cfg.max_seq_len
        ck = self.variable("cache", "cached_key", jnp.zeros, (b, hk, m, dh), dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, (b, hk, m, dh), dtype)
        return ck, cv

    def _write(self, ck, cv, k, v, idx):
        """Writes each row's new keys/values [B, Hk, T, Dh] at its own index and advances
        the index by T."""
        # One dynamic_update_slice per row (a scatter after vmap): rows start anywhere.
        def write(cache, new, start):
            return jax.lax.dynamic_update_slice(cache, new, (0, start, 0))

        ck.value = jax.vmap(write)(ck.value, k, idx.value)
        cv.value = jax.vmap(write)(cv.value, v, idx.value)
        idx.value = idx.value + k.shape[2]

