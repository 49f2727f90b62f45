"""Low-rank activation codec maths: PCA/SVD initialisation and latent quantisation (pure).

Shape legend: N tokens (any leading shape flattened), D model, R codec rank.

The end encodes the hidden state at a split boundary as ``z = (h - mu) @ W_enc`` ([N, R]),
quantises ``z`` per token, and the cloud decodes ``h' = z @ W_dec + mu``. Initialised from
the top-R principal directions of real activations (``W_enc = V_R``, ``W_dec = V_R^T``), the
codec at ``R = D`` without quantisation is the identity up to float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

QUANT_LEVELS = {"int8": 127, "int4": 7}


def pca_init(hidden: np.ndarray | jax.Array, rank: int) -> dict[str, np.ndarray]:
    """Codec parameters from the principal directions of ``hidden`` [N, D] (float64 SVD).

    Returns:
      ``{"mean": [D], "w_enc": [D, R], "w_dec": [R, D], "explained": [R]}`` where
      ``explained`` is the fraction of variance each direction carries.
    """
    h = np.asarray(hidden, np.float64).reshape(-1, np.shape(hidden)[-1])
    n, d = h.shape
    if not 1 <= rank <= d:
        raise ValueError(f"codec rank={rank} must lie in [1, D={d}]")
    if n < 2:
        raise ValueError(f"PCA needs at least 2 activation vectors, got {n}")
    mean = h.mean(0)
    _, s, vt = np.linalg.svd(h - mean, full_matrices=False)  # vt: [min(N, D), D]
    if vt.shape[0] < rank:
        raise ValueError(f"rank={rank} exceeds the {vt.shape[0]} directions that {n} samples "
                         "span; collect more activations")
    var = s**2
    basis = vt[:rank]
    return {
        "mean": mean.astype(np.float32),
        "w_enc": basis.T.astype(np.float32),
        "w_dec": basis.astype(np.float32),
        "explained": (var[:rank] / max(var.sum(), 1e-30)).astype(np.float32),
    }


def encode(params: dict, h: jax.Array) -> jax.Array:
    """[..., D] -> latent [..., R] (float32)."""
    return (h.astype(jnp.float32) - params["mean"]) @ params["w_enc"]


def decode(params: dict, z: jax.Array) -> jax.Array:
    """latent [..., R] -> [..., D] (float32)."""
    return z.astype(jnp.float32) @ params["w_dec"] + params["mean"]


def quantize(z: jax.Array, bits: str = "int8") -> tuple[jax.Array, jax.Array]:
    """Symmetric per-token quantisation: ``z ~= q * scale``.

    Args:
      z: <float32>[..., R] latents.
      bits: "int8" (levels -127..127) or "int4" (-7..7).

    Returns:
      ``(q <int8>[..., R], scale <float32>[...])`` with ``scale = max|z| / levels`` per token
      (1 for an all-zero token, so decoding stays exact there).
    """
    levels = _levels(bits)
    amax = jnp.max(jnp.abs(z), axis=-1)
    scale = jnp.where(amax > 0, amax / levels, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(z / scale[..., None]), -levels, levels).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    return q.astype(jnp.float32) * scale[..., None]


def quantization_bound(scale: jax.Array) -> jax.Array:
    """Largest per-element error of :func:`quantize`: half a step, ``scale / 2``, per token."""
    return scale / 2


def fake_quantize(z: jax.Array, bits: str | None) -> jax.Array:
    """Quantise-dequantise with a straight-through gradient (for fine-tuning)."""
    if bits is None:
        return z
    q, scale = quantize(z, bits)
    return z + jax.lax.stop_gradient(dequantize(q, scale) - z)


def roundtrip(params: dict, h: jax.Array, bits: str | None = "int8") -> jax.Array:
    """Encode, quantise (unless ``bits`` is None), dequantise and decode: [..., D] -> [..., D]."""
    return decode(params, fake_quantize(encode(params, h), bits))


def relative_error(h: jax.Array, h_hat: jax.Array) -> jax.Array:
    """``||h - h_hat||_F / ||h||_F``."""
    h = h.astype(jnp.float32)
    return jnp.linalg.norm(h - h_hat) / jnp.maximum(jnp.linalg.norm(h), 1e-30)


def _levels(bits: str) -> int:
    if bits not in QUANT_LEVELS:
        raise ValueError(f"latent quantisation {bits!r} must be one of {sorted(QUANT_LEVELS)}")
    return QUANT_LEVELS[bits]
