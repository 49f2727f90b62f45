"""Causal multi-head (grouped-query) attention with RoPE and a KV cache for decoding.

Shape legend: B batch, T new tokens, S attended positions, M cache length (max_seq_len),
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
    collection (cached keys/values [B, M, Hk, Dh] and a scalar write index), so one call
    can prefill a whole prompt and later calls add one token each. Writing past
    ``max_seq_len`` cannot be checked inside jit (``dynamic_update_slice`` clamps), so callers
    must guard it, as :func:`ec2moe_jax.models.generate` does."""

    cfg: ModelConfig

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
            # The cache knows where this chunk goes; positions follow from its write index.
            idx = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            positions = jnp.broadcast_to(idx.value + jnp.arange(t, dtype=jnp.int32), (b, t))
        q = rope(proj("wq", h), positions, cfg.rope_theta)
        k = rope(proj("wk", hk), positions, cfg.rope_theta)
        v = proj("wv", hk)
        q_pos, k_pos = positions, positions
        if decode:
            k, v, k_pos = self._update_cache(k, v, idx)

        if hk != h:  # grouped-query attention: each key/value head serves h // hk queries
            k, v = jnp.repeat(k, h // hk, axis=2), jnp.repeat(v, h // hk, axis=2)
        # [B, H, T, Dh] layout: plain batched matmuls are the fastest form on XLA:CPU.
        q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
        scores = (q @ k.transpose(0, 1, 3, 2)).astype(jnp.float32) * dh**-0.5
        causal = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
        scores = jnp.where(causal[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = (probs @ v).transpose(0, 2, 1, 3)  # [B, T, H, Dh]
        wo = self.param("wo", param_with_axes(default_init, ("heads", "head_dim", "embed")),
                        (h, dh, d))
        y = dense(out.reshape(b, t, h * dh), wo.astype(dtype).reshape(h * dh, d))
        if cfg.attention_bias == "all":
            y = y + self.param("bo", param_with_axes(nn.initializers.zeros, ("embed",)),
                               (d,)).astype(dtype)
        return y

    def _update_cache(self, k, v, idx):
        """Writes the new keys/values at the cache index; returns the whole cache."""
        b, t, hk, dh = k.shape
        m = self.cfg.max_seq_len
        ck = self.variable("cache", "cached_key", jnp.zeros, (b, m, hk, dh), k.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, (b, m, hk, dh), v.dtype)
        start = idx.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, start, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, start, 0, 0))
        idx.value = start + t
        # Slots not yet written get position m (beyond every query), so they are masked.
        slot = jnp.arange(m, dtype=jnp.int32)
        k_pos = jnp.where(slot < start + t, slot, m)
        return ck.value, cv.value, jnp.broadcast_to(k_pos, (b, m))
