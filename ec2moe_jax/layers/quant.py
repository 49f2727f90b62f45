"""Weight-only quantisation of expert weights for the end device: int8 or int4 values with
bfloat16 scales per output channel and input group, dequantised where the weight is used.

Shape legend: E experts, I input features (the contracted axis), O output features,
G = I / g input groups of ``g`` features.

``w[e, i, o] ~= scale[e, i // g, o] * q[e, i, o]``, symmetric, ``q`` in
``[-2^(b-1), 2^(b-1) - 1]``. The scale of each (expert, group, output channel) comes from a
grid search over clipping ratios of the group's absolute maximum that minimises the squared
error (MSE range setting: Nagel et al. 2021, "A White Paper on Neural Network Quantization",
sec. 3.4; llama.cpp's quantisers search the scale the same way), so clipping a few outliers
buys finer steps for the rest. int4 values are packed two per byte along the input axis, so
the stored bytes are exactly ``E I O b / 8`` plus ``2 E G O`` of scales
(:meth:`QuantSpec.bytes_per_matrix`), the figure expert selection and the scheduler count.
"""

from __future__ import annotations

import dataclasses
import re

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCALE_BYTES = 2  # bfloat16 scales
# Grid of the MSE scale search, from 1.0 (no clipping) down: a tie keeps the larger scale.
_CLIP_RATIOS = np.linspace(1.0, 0.5, 11)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How the end stores its resident experts.

    Attributes:
      bits: 16 (bfloat16, the unquantised reference), 8 or 4.
      group_size: input features sharing one scale; None: the whole input axis (one scale
        per output channel).
    """

    bits: int = 16
    group_size: int | None = None

    def __post_init__(self):
        if self.bits not in (16, 8, 4):
            raise ValueError(f"bits={self.bits}: expert weights are stored in 16 (bf16), 8 or "
                             "4 bits")
        if self.group_size is not None and (
                self.group_size < 1 or (self.bits == 4 and self.group_size % 2)):
            raise ValueError(f"group_size={self.group_size} must be >= 1 (even for 4 bits, "
                             "whose values pack two per byte) or None (one scale per output "
                             "channel)")

    @property
    def name(self) -> str:
        """``"bf16"``, ``"int8"``, ``"int4"`` or with a group size, ``"int4-g64"``."""
        if self.bits == 16:
            return "bf16"
        return f"int{self.bits}" + (f"-g{self.group_size}" if self.group_size else "")

    @classmethod
    def parse(cls, name: str) -> QuantSpec:
        """The spec of a :attr:`name`; ValueError naming the accepted forms."""
        m = re.fullmatch(r"bf16|int(8|4)(?:-g(\d+))?", name)
        if not m:
            raise ValueError(f"expert weights {name!r}: use bf16, int8, int4 or int<8|4>-g<group>"
                             " (e.g. int4-g64)")
        if name == "bf16":
            return cls()
        return cls(int(m.group(1)), int(m.group(2)) if m.group(2) else None)

    def groups(self, inputs: int) -> int:
        """G, the scale groups along an input axis of ``inputs`` features."""
        if self.group_size is None:
            return 1
        if inputs % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide the input axis "
                             f"({inputs} features)")
        return inputs // self.group_size

    def bytes_per_matrix(self, inputs: int, outputs: int) -> int:
        """Exact stored bytes of one [I, O] weight: values plus bf16 scales."""
        if self.bits == 16:
            return 2 * inputs * outputs
        return inputs * outputs * self.bits // 8 + SCALE_BYTES * self.groups(inputs) * outputs


BF16 = QuantSpec()


@flax.struct.dataclass
class QuantizedWeight:
    """A quantised stack of expert weights [E, I, O].

    Attributes:
      q: <int8>[E, I, O] (8 bits) or <uint8>[E, I / 2, O] (4 bits, two values per byte: even
        input rows in the low nibble, odd rows in the high one, offset by 8).
      scale: <bfloat16>[E, G, O].
      bits, group_size: see :class:`QuantSpec` (static).
    """

    q: jax.Array
    scale: jax.Array
    bits: int = flax.struct.field(pytree_node=False)
    group_size: int | None = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        e, i, o = self.q.shape
        return (e, i * 2 if self.bits == 4 else i, o)

    @property
    def nbytes(self) -> int:
        return int(self.q.size * self.q.dtype.itemsize + self.scale.size * SCALE_BYTES)

    def values(self) -> jax.Array:
        """<int8>[E, I, O] the integer values (4-bit ones unpacked)."""
        if self.bits == 8:
            return self.q
        lo = (self.q & 15).astype(jnp.int8) - 8
        hi = (self.q >> 4).astype(jnp.int8) - 8
        e, half, o = self.q.shape
        return jnp.stack([lo, hi], axis=2).reshape(e, 2 * half, o)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """<dtype>[E, I, O] ``scale * q`` (float32 maths, then cast)."""
        q = self.values().astype(jnp.float32)
        e, i, o = q.shape
        g = self.scale.shape[1]
        w = q.reshape(e, g, i // g, o) * self.scale.astype(jnp.float32)[:, :, None, :]
        return w.reshape(e, i, o).astype(dtype)


def quantize(w: jax.Array, spec: QuantSpec, search: bool = True) -> QuantizedWeight:
    """Quantises stacked expert weights ``w`` <float>[E, I, O] (``spec.bits`` 8 or 4).

    Args:
      search: pick each scale by the MSE grid search over clipping ratios (default); False:
        the plain absmax scale, so every ``|w - dequantize(q)| <= scale / 2``.

    Raises:
      ValueError: ``spec`` is bf16, ``w`` is not 3-D, or the group size does not divide I
        (or I is odd for 4 bits). Scales are bfloat16: weights beyond its range (about
        3e38) or below its smallest normal (about 1e-38) do not survive.
    """
    if spec.bits == 16:
        raise ValueError("QuantSpec(bits=16) is the unquantised reference: nothing to quantise")
    if w.ndim != 3:
        raise ValueError(f"expert weights must be stacked [E, I, O]; got shape {w.shape}")
    e, i, o = w.shape
    g = spec.groups(i)
    if spec.bits == 4 and i % 2:
        raise ValueError(f"4-bit packing needs an even input axis; got I={i}")
    qmin, qmax = -(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1
    wg = jnp.asarray(w, jnp.float32).reshape(e, g, i // g, o)
    absmax = jnp.max(jnp.abs(wg), axis=2, keepdims=True)  # [E, G, 1, O]
    # Errors compared relative to the group's range, so tiny or huge weights neither
    # underflow nor overflow into ties.
    unit = jnp.where(absmax > 0, absmax, 1.0)

    def rounded(scale):
        scale = scale.astype(jnp.bfloat16).astype(jnp.float32)  # the scale as stored
        safe = jnp.where(scale > 0, scale, 1.0)
        return jnp.clip(jnp.round(wg / safe), qmin, qmax), scale

    ratios = _CLIP_RATIOS if search else np.ones(1)
    best_err = best_scale = None
    for r in ratios:
        q, scale = rounded(absmax * (r / qmax))
        err = jnp.sum(jnp.square((wg - q * scale) / unit), axis=2, keepdims=True)
        if best_err is None:
            best_err, best_scale = err, scale
        else:
            better = err < best_err
            best_err = jnp.where(better, err, best_err)
            best_scale = jnp.where(better, scale, best_scale)
    q, scale = rounded(best_scale)
    q = q.reshape(e, i, o).astype(jnp.int8)
    if spec.bits == 4:
        u = (q + 8).astype(jnp.uint8).reshape(e, i // 2, 2, o)
        q = u[:, :, 0] | (u[:, :, 1] << 4)
    return QuantizedWeight(q=q, scale=scale[:, :, 0, :].astype(jnp.bfloat16), bits=spec.bits,
                           group_size=spec.group_size)


def relative_error(w: jax.Array, qw: QuantizedWeight) -> float:
    """``||w - dequantize(qw)||_F / ||w||_F`` over the whole stack."""
    w = jnp.asarray(w, jnp.float32)
    return float(jnp.linalg.norm(w - qw.dequantize()) / jnp.maximum(jnp.linalg.norm(w), 1e-30))

