"""Hidden state <-> bytes on the wire, through the codec (end: compress; cloud: decompress).

Shape legend: B batch, T time, D model, R rank.
"""

from __future__ import annotations

import jax
import numpy as np

from ec2moe_jax.codec import lowrank, wire


def compress(params: dict, h: jax.Array, bits: str | None = "int8") -> bytes:
    """[B, T, D] hidden state -> payload bytes (rank-R latents, quantised unless None)."""
    if h.ndim != 3:
        raise ValueError(f"hidden state must be [B, T, D], got shape {h.shape}")
    z = lowrank.encode(params, h)
    if not bool(np.all(np.isfinite(np.asarray(z)))):
        raise ValueError("hidden state (or its latent) contains NaN or infinity; refusing to "
                         "encode it")
    if bits is None:  # unquantised latents travel as float32, exactly what evaluation models
        return wire.pack(np.asarray(z, np.float32), None, "float32")
    q, scale = lowrank.quantize(z, bits)
    return wire.pack(np.asarray(q), np.asarray(scale), bits)


def decompress(params: dict, payload: bytes) -> jax.Array:
    """Payload bytes -> [B, T, D] hidden state (float32); validates the payload first."""
    rank = int(np.shape(params["w_dec"])[0])
    latent = wire.unpack(payload, expected_rank=rank)
    if latent.scale is None:
        z = latent.values
    else:
        z = latent.values.astype(np.float32) * latent.scale[..., None]
    return lowrank.decode(params, z)
