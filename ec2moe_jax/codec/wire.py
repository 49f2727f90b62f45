"""The wire format of a compressed hidden state: versioned, length-prefixed, no pickle.

Layout (little-endian), a 24-byte header then the body::

    offset  size  field
    0       4     magic b"EC2W"
    4       1     version (1)
    5       1     kind: 1 = int8 latents, 2 = int4 latents (two per byte), 3 = float16,
                  4 = float32, 5 = bfloat16
    6       2     rank R (uint16)
    8       4     batch B (uint32)
    12      4     time T (uint32)
    16      8     body length in bytes (uint64)
    24      ...   body: per-token float32 scales [B * T] (quantised kinds only), then the
                  latents [B, T, R] row-major (int4: low nibble first, zero-padded to a byte)

A reader checks every field against the bytes it holds before touching the body, so a
truncated, oversized, mislabelled or non-finite payload raises :class:`WireFormatError` with
the offending value, never a crash and never silent garbage.

The values are latents of a low-rank codec (R = its rank) or, for a raw hidden state, the
hidden state itself (R = D). :class:`~ec2moe_jax.codec.spec.CodecSpec` names what a split
sends and maps it onto these kinds; :func:`token_bytes` is the one size formula.
"""

from __future__ import annotations

import dataclasses
import math
import struct

import ml_dtypes
import numpy as np

MAGIC = b"EC2W"
VERSION = 1
HEADER = struct.Struct("<4sBBHIIQ")
HEADER_BYTES = HEADER.size  # 24
TOKEN_BYTES = 4  # a token id (int32) or a per-token float32 score on the wire
KINDS = {"int8": 1, "int4": 2, "float16": 3, "float32": 4, "bfloat16": 5}
QUANTISED = ("int8", "int4")  # kinds with per-token float32 scales
_FLOAT_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"),
                 "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_KIND_NAMES = {v: k for k, v in KINDS.items()}
MAX_BODY_BYTES = 1 << 32  # 4 GiB: far above any single hidden state we send


class WireFormatError(ValueError):
    """A payload that cannot be decoded; the message names the bad field and value."""


@dataclasses.dataclass(frozen=True)
class Latent:
    """A decoded payload: latents [B, T, R] (int8 or float) and scales [B, T] (or None)."""

    kind: str
    values: np.ndarray
    scale: np.ndarray | None


def token_bytes(kind: str, rank: int) -> float:
    """Body bytes one token adds to a payload of ``kind`` with ``rank`` values per token.

    int8: a float32 scale and R levels; int4: the scale and R nibbles (R / 2 bytes: nibbles
    pack across tokens, so only a message's last byte may hold padding); float16/bfloat16:
    2 R; float32: 4 R. The scheduler's cost model and :func:`body_bytes` both use it.
    """
    if kind == "int8":
        return 4.0 + rank
    if kind == "int4":
        return 4.0 + rank / 2
    if kind in _FLOAT_DTYPES:
        return float(_FLOAT_DTYPES[kind].itemsize * rank)
    raise WireFormatError(f"unknown latent kind {kind!r}; expected one of {sorted(KINDS)}")


def body_bytes(kind: str, batch: int, time: int, rank: int) -> int:
    """Exact body size of a payload: what the link carries besides the 24-byte header
    (``batch * time`` tokens of :func:`token_bytes`, an odd int4 nibble count padded)."""
    # Every token_bytes value is a multiple of 1/2, so the product is exact in float64.
    return math.ceil(batch * time * token_bytes(kind, rank))


def payload_bytes(kind: str, batch: int, time: int, rank: int) -> int:
    """Exact size of a whole payload: the 24-byte header plus :func:`body_bytes`."""
    return HEADER_BYTES + body_bytes(kind, batch, time, rank)


def pack(values: np.ndarray, scale: np.ndarray | None, kind: str) -> bytes:
    """Serialises latents [B, T, R] (int8 levels, or floats) and per-token scales [B, T]."""
    values = np.asarray(values)
    if values.ndim != 3:
        raise WireFormatError(f"latents must be [B, T, R], got shape {values.shape}")
    b, t, r = values.shape
    if not 1 <= r <= 0xFFFF:
        raise WireFormatError(f"rank={r} must lie in [1, 65535]")
    if kind not in KINDS:
        raise WireFormatError(f"unknown latent kind {kind!r}; expected one of {sorted(KINDS)}")
    parts = []
    if kind in QUANTISED:
        scale = np.asarray(scale, "<f4")
        if scale.shape != (b, t):
            raise WireFormatError(f"scale shape {scale.shape} must be {(b, t)}")
        if not np.all(np.isfinite(scale)):
            raise WireFormatError("scale contains NaN or infinity; refusing to send it")
        parts.append(scale.tobytes())
        levels = values.astype(np.int8).reshape(-1)
        if kind == "int4":
            if np.any(np.abs(levels.astype(np.int16)) > 7):
                raise WireFormatError("int4 latents must lie in [-7, 7]")
            nib = (levels.astype(np.int16) & 0xF).astype(np.uint8)
            if nib.size % 2:
                nib = np.concatenate([nib, np.zeros(1, np.uint8)])
            parts.append((nib[0::2] | (nib[1::2] << 4)).tobytes())
        else:
            parts.append(levels.tobytes())
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            cast = values.astype(_FLOAT_DTYPES[kind])
        if not np.all(np.isfinite(cast.astype(np.float32))):
            raise WireFormatError(f"latents are not finite as {kind} (NaN, infinity or "
                                  "overflow); refusing to send them")
        parts.append(cast.tobytes())
    body = b"".join(parts)
    assert len(body) == body_bytes(kind, b, t, r)
    return HEADER.pack(MAGIC, VERSION, KINDS[kind], r, b, t, len(body)) + body


def unpack(buf: bytes, expected_rank: int | None = None) -> Latent:
    """Parses and validates a payload; raises :class:`WireFormatError` on anything amiss."""
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"payload must be bytes, got {type(buf).__name__}")
    buf = bytes(buf)
    if len(buf) < HEADER_BYTES:
        raise WireFormatError(f"truncated header: {len(buf)} bytes, need {HEADER_BYTES}")
    magic, version, kind_code, rank, b, t, length = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {magic!r}: not an ec2moe payload (expected {MAGIC!r})")
    if version != VERSION:
        raise WireFormatError(f"unsupported wire version {version}; this reader speaks "
                              f"{VERSION}")
    if kind_code not in _KIND_NAMES:
        raise WireFormatError(f"unknown latent kind code {kind_code}")
    kind = _KIND_NAMES[kind_code]
    if rank == 0 or (expected_rank is not None and rank != expected_rank):
        raise WireFormatError(f"payload rank {rank} does not match the codec's rank "
                              f"{expected_rank}")
    if length > MAX_BODY_BYTES:
        raise WireFormatError(f"length field {length} exceeds the {MAX_BODY_BYTES}-byte limit")
    if length != len(buf) - HEADER_BYTES:
        raise WireFormatError(f"length field says {length} body bytes but "
                              f"{len(buf) - HEADER_BYTES} follow (truncated or padded)")
    need = body_bytes(kind, b, t, rank)
    if length != need:
        raise WireFormatError(f"shape [B={b}, T={t}, R={rank}] of kind {kind} needs {need} "
                              f"body bytes, length field says {length}")
    body = memoryview(buf)[HEADER_BYTES:]
    n = b * t
    if kind in QUANTISED:
        scale = np.frombuffer(body[: 4 * n], "<f4").astype(np.float32).reshape(b, t)
        if not np.all(np.isfinite(scale)) or np.any(scale < 0):
            raise WireFormatError("payload scale contains NaN, infinity or a negative value")
        raw = np.frombuffer(body[4 * n:], np.uint8)
        if kind == "int8":
            levels = raw.view(np.int8)
            if np.any(levels == -128):
                raise WireFormatError("int8 payload holds -128, outside the codec's [-127, 127]")
        else:
            if (n * rank) % 2 and raw.size and raw[-1] >> 4:
                raise WireFormatError("int4 payload has a non-zero padding nibble")
            nib = np.stack([raw & 0xF, raw >> 4], axis=1).reshape(-1)[: n * rank]
            levels = np.where(nib > 7, nib.astype(np.int16) - 16, nib).astype(np.int8)
            if np.any(levels == -8):
                raise WireFormatError("int4 payload holds -8, outside the codec's [-7, 7]")
        return Latent(kind, levels.reshape(b, t, rank).copy(), scale)
    values = np.frombuffer(body, _FLOAT_DTYPES[kind]).astype(np.float32).reshape(b, t, rank)
    if not np.all(np.isfinite(values)):
        raise WireFormatError("payload latents contain NaN or infinity")
    return Latent(kind, values, None)
