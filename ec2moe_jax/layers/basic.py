"""Small building blocks: RMSNorm, rotary embeddings, the SwiGLU MLP.

Shape legend: B batch, T time, D model, F hidden, H heads, Dh head dim.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax import kernels
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
    y = kernels.matmul(x.reshape(-1, d), w.reshape(d, -1))  # one row (a decode step): threaded
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


def yarn_frequencies(dim: int, theta: float, factor: float, original_max_len: int,
                     beta_fast: float = 32.0, beta_slow: float = 1.0,
                     truncate: bool = True) -> tuple[np.ndarray, float]:
    """YaRN's inverse frequencies <float32>[dim/2] and attention factor (the scale of cos and
    sin), as transformers' ``_compute_yarn_parameters`` computes them (Peng et al. 2023,
    "YaRN: Efficient Context Window Extension", sec. 3.2-3.4: NTK-by-parts interpolation
    between ``1/(theta^(2i/dim))`` and its ``/factor`` over the correction range of
    ``beta_fast``..``beta_slow`` rotations, and ``0.1 ln(factor) + 1``)."""
    def correction_dim(rotations):
        return dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrapolation = 1 - ramp
    inv = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv.astype(np.float32), scale


def rope(x: jax.Array, positions: jax.Array, theta: float,
         yarn: tuple | None = None) -> jax.Array:
    """Rotary position embedding, rotate-half layout (as in Llama/Mixtral checkpoints).

    Args:
      x: [B, T, H, Dh].
      positions: <int32>[B, T] absolute positions.
      theta: RoPE base.
      yarn: None, or ``(factor, original_max_len, beta_fast, beta_slow, truncate)`` for
        YaRN frequencies and cos/sin scale (:func:`yarn_frequencies`).

    Returns:
      [B, T, H, Dh] rotated.
    """
    half = x.shape[-1] // 2
    scale = 1.0
    if yarn is None:
        freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    else:
        freq, scale = yarn_frequencies(x.shape[-1], theta, *yarn)
        freq = jnp.asarray(freq)
    angle = positions.astype(jnp.float32)[..., None] * freq  # [B, T, Dh/2]
    cos = jnp.cos(angle)[:, :, None, :] * scale
    sin = jnp.sin(angle)[:, :, None, :] * scale
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
