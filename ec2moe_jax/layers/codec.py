"""The low-rank link codec as a thin linen module (maths in :mod:`ec2moe_jax.codec.lowrank`).

Shape legend: D model, R rank. Parameters: ``mean`` [D], ``w_enc`` [D, R], ``w_dec`` [R, D],
the same dict the pure functions take, so ``codec.apply({'params': p}, h)`` and
``lowrank.roundtrip(p, h)`` agree.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from ec2moe_jax.codec import lowrank


class LowRankCodec(nn.Module):
    """Encoder (end, D -> R) and decoder (cloud, R -> D) with an optional quantised latent."""

    d_model: int
    rank: int
    bits: str | None = "int8"  # latent quantisation: "int8", "int4" or None (float)

    def setup(self):
        if not 1 <= self.rank <= self.d_model:
            raise ValueError(f"codec rank={self.rank} must lie in [1, D={self.d_model}]")
        ortho = nn.initializers.orthogonal()
        self.mean = self.param("mean", nn.initializers.zeros, (self.d_model,))
        self.w_enc = self.param("w_enc", ortho, (self.d_model, self.rank))
        self.w_dec = self.param("w_dec", lambda k, s: ortho(k, s[::-1]).T, (self.rank,
                                                                            self.d_model))

    def _params(self) -> dict:
        return {"mean": self.mean, "w_enc": self.w_enc, "w_dec": self.w_dec}

    def encode(self, h: jax.Array) -> jax.Array:
        """[..., D] -> float latent [..., R] (quantise with :func:`lowrank.quantize`)."""
        return lowrank.encode(self._params(), h)

    def decode(self, z: jax.Array) -> jax.Array:
        return lowrank.decode(self._params(), z)

    def __call__(self, h: jax.Array) -> jax.Array:
        """Encode, quantise (straight-through), decode: [..., D] -> [..., D]."""
        return lowrank.roundtrip(self._params(), h, self.bits)
