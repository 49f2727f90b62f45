"""Weight-only quantisation of expert weights for the end device: int8, int4 or int2 values
with bfloat16 scales per output channel and input group, dequantised where the weight is
used; one format for every expert, or a mix (hot experts in more bits, cold ones in fewer,
:class:`QuantizedExperts`).

Shape legend: E experts, I input features (the contracted axis), O output features,
G = I / g input groups of ``g`` features.

``w[e, i, o] ~= scale[e, i // g, o] * q[e, i, o]``, symmetric, ``q`` in
``[-2^(b-1), 2^(b-1) - 1]``. The scale of each (expert, group, output channel) comes from a
grid search over clipping ratios of the group's absolute maximum that minimises the squared
error (MSE range setting: Nagel et al. 2021, "A White Paper on Neural Network Quantization",
sec. 3.4; llama.cpp's quantisers search the scale the same way), so clipping a few outliers
buys finer steps for the rest. int4 values are packed two per byte and int2 values four per
byte along the input axis, so the stored bytes are exactly ``E I O b / 8`` plus ``2 E G O``
of scales (:meth:`QuantSpec.bytes_per_matrix`), the figure expert selection and the
scheduler count.
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
      bits: 16 (bfloat16, the unquantised reference), 8, 4 or 2.
      group_size: input features sharing one scale; None: the whole input axis (one scale
        per output channel).
    """

    bits: int = 16
    group_size: int | None = None

    def __post_init__(self):
        if self.bits not in (16, 8, 4, 2):
            raise ValueError(f"bits={self.bits}: expert weights are stored in 16 (bf16), 8, 4 "
                             "or 2 bits")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} must be >= 1 or None (one scale "
                             "per output channel)")

    @property
    def name(self) -> str:
        """``"bf16"``, ``"int8"``, ``"int4"``, ``"int2"`` or with a group size, ``"int4-g64"``."""
        if self.bits == 16:
            return "bf16"
        return f"int{self.bits}" + (f"-g{self.group_size}" if self.group_size else "")

    @classmethod
    def parse(cls, name: str) -> QuantSpec:
        """The spec of a :attr:`name`; ValueError naming the accepted forms."""
        m = re.fullmatch(r"bf16|int(8|4|2)(?:-g(\d+))?", name)
        if not m:
            raise ValueError(f"expert weights {name!r}: use bf16, int8, int4, int2 or "
                             "int<8|4|2>-g<group> (e.g. int4-g64)")
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

    def expert_bytes(self, d_model: int, expert_dim: int) -> int:
        """Exact stored bytes of one SwiGLU expert: ``w_gate``, ``w_up`` [D, F], ``w_down``
        [F, D]."""
        return (2 * self.bytes_per_matrix(d_model, expert_dim)
                + self.bytes_per_matrix(expert_dim, d_model))

    @property
    def per_byte(self) -> int:
        """Values packed into one byte along the input axis (1 for 8 and 16 bits)."""
        return 8 // self.bits if self.bits < 8 else 1


BF16 = QuantSpec()


@flax.struct.dataclass
class QuantizedWeight:
    """A quantised stack of expert weights [E, I, O].

    Attributes:
      q: <int8>[E, I, O] (8 bits), or <uint8>[E, I / n, O] with n = 2 (4 bits) or 4 (2
        bits) values per byte: input row ``n j + k`` in bits ``[k b, (k + 1) b)`` of byte
        ``j``, offset by ``2^(b-1)``.
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
        return (e, i * QuantSpec(self.bits).per_byte, o)

    @property
    def nbytes(self) -> int:
        return int(self.q.size * self.q.dtype.itemsize + self.scale.size * SCALE_BYTES)

    def values(self) -> jax.Array:
        """<int8>[E, I, O] the integer values (4-bit ones unpacked)."""
        if self.bits == 8:
            return self.q
        n, mask, offset = 8 // self.bits, 2 ** self.bits - 1, 2 ** (self.bits - 1)
        parts = [((self.q >> (k * self.bits)) & mask).astype(jnp.int8) - offset
                 for k in range(n)]
        e, rows, o = self.q.shape
        return jnp.stack(parts, axis=2).reshape(e, n * rows, o)

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
        (or I is not a multiple of the values packed per byte: 2 for 4 bits, 4 for 2).
        Scales are bfloat16: weights beyond its range (about 3e38) or below its smallest
        normal (about 1e-38) do not survive.
    """
    if spec.bits == 16:
        raise ValueError("QuantSpec(bits=16) is the unquantised reference: nothing to quantise")
    if w.ndim != 3:
        raise ValueError(f"expert weights must be stacked [E, I, O]; got shape {w.shape}")
    e, i, o = w.shape
    g = spec.groups(i)
    if i % spec.per_byte:
        raise ValueError(f"{spec.bits}-bit packing needs an input axis that is a multiple of "
                         f"{spec.per_byte}; got I={i}")
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
    if spec.bits < 8:
        n = spec.per_byte
        u = (q - qmin).astype(jnp.uint8).reshape(e, i // n, n, o)
        q = u[:, :, 0]
        for k in range(1, n):
            q = q | (u[:, :, k] << (k * spec.bits))
    return QuantizedWeight(q=q, scale=scale[:, :, 0, :].astype(jnp.bfloat16), bits=spec.bits,
                           group_size=spec.group_size)


def relative_error(w: jax.Array, qw: QuantizedWeight) -> float:
    """``||w - dequantize(qw)||_F / ||w||_F`` over the whole stack."""
    w = jnp.asarray(w, jnp.float32)
    return float(jnp.linalg.norm(w - qw.dequantize()) / jnp.maximum(jnp.linalg.norm(w), 1e-30))



@flax.struct.dataclass
class QuantizedExperts:
    """A stack of E experts' weights [E, I, O] stored in several formats (mixed precision):
    each part holds some experts in one format; experts in no part are not stored (the end
    does not hold them, and the router must not choose them).

    Attributes:
      parts: ``((index <int32>[n], QuantizedWeight [n, I, O] or a float array), ...)``.
      num_experts: E (static).
    """

    parts: tuple
    num_experts: int = flax.struct.field(pytree_node=False)

    @property
    def nbytes(self) -> int:
        """Stored bytes of the weights and scales (the few bytes of indices excluded)."""
        return int(sum(w.nbytes if isinstance(w, QuantizedWeight) else w.size * 2
                       for _, w in self.parts))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """<dtype>[E, I, O]; experts not stored are zero."""
        first = self.parts[0][1]
        _, i, o = first.shape
        out = jnp.zeros((self.num_experts, i, o), dtype)
        for index, w in self.parts:
            part = w.dequantize(dtype) if isinstance(w, QuantizedWeight) else w.astype(dtype)
            out = out.at[index].set(part)
        return out


def quantize_mixed(w: jax.Array, bits, group_size: int | None = None,
                   search: bool = True) -> QuantizedExperts:
    """Stores expert ``e`` of ``w`` <float>[E, I, O] in ``bits[e]`` bits: 16 (bfloat16), 8,
    4 or 2, or 0 (not stored).

    Raises:
      ValueError: ``bits`` is not E values of {0, 2, 4, 8, 16}, or stores no expert.
    """
    bits = np.asarray(bits, np.int64)
    e = w.shape[0]
    if bits.shape != (e,) or not np.isin(bits, (0, 2, 4, 8, 16)).all():
        raise ValueError(f"bits={bits.tolist()} must hold {e} values of 0, 2, 4, 8, 16")
    if not bits.any():
        raise ValueError("bits stores no expert; keep at least one")
    parts = []
    for b in sorted(set(bits.tolist()) - {0}, reverse=True):
        index = np.flatnonzero(bits == b).astype(np.int32)
        sub = jnp.asarray(w)[index]
        stored = (sub.astype(jnp.bfloat16) if b == 16
                  else quantize(sub, QuantSpec(b, group_size), search))
        parts.append((jnp.asarray(index), stored))
    return QuantizedExperts(tuple(parts), e)
