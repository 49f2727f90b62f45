"""Small building blocks: RMSNorm, rotary embeddings, the SwiGLU MLP.

Shape legend: B batch, T time, D model, F hidden, H heads, Dh head dim.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ec2moe_jax.routing.dispatch import swiglu

default_init = nn.initializers.normal(stddev=0.02)


def param_with_axes(init, names: tuple[str | None, ...]):
    """An initialiser whose value carries logical axis names (for sharding rules)."""
    return nn.with_logical_partitioning(init, names)


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., D] @ w [D, *out] -> [..., *out]`` as one 2-D matmul.

    XLA:CPU runs the weight gradient of a 3-D ``btd,df->btf`` contraction (two contracting
    dims) about twice as slowly as the same product flattened to 2-D, so we flatten.
    """
    lead, d = x.shape[:-1], x.shape[-1]
    out = w.shape[1:]
    y = x.reshape(-1, d) @ w.reshape(d, -1)
    return y.reshape(*lead, *out)


class RMSNorm(nn.Module):
    """``x / rms(x) * scale``, computed in float32 (Zhang & Sennrich 2019)."""

    eps: float = 1e-6
    axis_name: str = "embed"  # logical name of the normalised axis

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", param_with_axes(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, rotate-half layout (as in Llama/Mixtral checkpoints).

    Args:
      x: [B, T, H, Dh].
      positions: <int32>[B, T] absolute positions.
      theta: RoPE base.

    Returns:
      [B, T, H, Dh] rotated.
    """
    half = x.shape[-1] // 2
    freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = positions.astype(jnp.float32)[..., None] * freq  # [B, T, Dh/2]
    cos = jnp.cos(angle)[:, :, None, :]
    sin = jnp.sin(angle)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward (:func:`~ec2moe_jax.routing.dispatch.swiglu`)."""

    hidden: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        wg = self.param("w_gate", param_with_axes(default_init, ("embed", "mlp")), (d, self.hidden))
        wu = self.param("w_up", param_with_axes(default_init, ("embed", "mlp")), (d, self.hidden))
        wd = self.param("w_down", param_with_axes(default_init, ("mlp", "embed")), (self.hidden, d))
        x = x.astype(self.dtype)
        return swiglu(x, wg.astype(self.dtype), wu.astype(self.dtype), wd.astype(self.dtype),
                      dense)
