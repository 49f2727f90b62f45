"""The wire format of what crosses the link: versioned, checksummed, length-prefixed, no pickle.

Layout (little-endian), a 24-byte header then the body::

    offset  size  field
    0       4     magic b"EC2W"
    4       1     version (2)
    5       1     kind: 1 = int8 latents, 2 = int4 latents (two per byte), 3 = float16,
                  4 = float32, 5 = bfloat16, 6 = int32 (token ids)
    6       2     rank R (uint16): values per token
    8       4     batch B (uint32)
    12      4     time T (uint32)
    16      4     body length in bytes (uint32)
    20      4     CRC32C (Castagnoli) of header bytes [0, 20) followed by the body
    24      ...   body: per-token float32 scales [B * T] (quantised kinds only), then the
                  values [B, T, R] row-major (int4: low nibble first, zero-padded to a byte)

Version 1 (until the serving protocol) had no checksum (a 64-bit length where the CRC now
is): 98% of single-bit flips in its body decoded to a different tensor without error, so a
reader refuses it by name. The CRC32C detects every 1-, 2- and 3-bit error and every burst
up to 32 bits in a message of this size (Castagnoli 1993), and a header whose B and T were
swapped after packing.

A reader checks every header field against the configured :class:`WireLimits` and against
the bytes it holds before touching the body, so a truncated, oversized, mislabelled,
corrupted or non-finite payload raises :class:`WireFormatError` with the offending value,
never a crash, never silent garbage and never work proportional to a *declared* size (a
24-byte payload declaring B = 2^32 - 1 is refused in microseconds). A writer refuses what its
reader would refuse (out-of-range levels, negative or non-finite scales): :func:`pack` never
wraps an int8 level.

The values are latents of a low-rank codec (R = its rank), the raw hidden state (R = D), or
token ids / float32 scores (kind int32 / float32, R = 1).
:class:`~ec2moe_jax.codec.spec.CodecSpec` names what a split sends and maps it onto these
kinds; :func:`token_bytes` is the one size formula.
"""

from __future__ import annotations

import dataclasses
import math
import struct

import google_crc32c
import ml_dtypes
import numpy as np

MAGIC = b"EC2W"
VERSION = 2
RETIRED = {1: "version 1 (no checksum; written by ec2moe-jax before the serving protocol)"}
HEADER = struct.Struct("<4sBBHIIII")
HEADER_BYTES = HEADER.size  # 24
_CHECKED = HEADER_BYTES - 4  # header bytes the checksum covers: all but the checksum itself
TOKEN_BYTES = 4  # a token id (int32) or a per-token float32 score on the wire
KINDS = {"int8": 1, "int4": 2, "float16": 3, "float32": 4, "bfloat16": 5, "int32": 6}
QUANTISED = ("int8", "int4")  # kinds with per-token float32 scales
_LEVELS = {"int8": 127, "int4": 7}  # symmetric level range of the quantised kinds
_FLOAT_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"),
                 "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_KIND_NAMES = {v: k for k, v in KINDS.items()}
_U32 = 0xFFFFFFFF


class WireFormatError(ValueError):
    """A payload that cannot be decoded or must not be sent; the message names the bad field
    and value."""


@dataclasses.dataclass(frozen=True)
class WireLimits:
    """What a reader accepts before it touches a body: the work a payload can ask for.

    Attributes:
      max_batch: largest B.
      max_time: largest T.
      max_rank: largest R (values per token).
      max_values: largest B * T * R, the elements a decoder allocates and converts.

    A server derives them from its model (:meth:`for_model`); the defaults bound a reader
    that knows nothing to 256 Mi values (1 GiB of float32).
    """

    max_batch: int = 1 << 12
    max_time: int = 1 << 16
    max_rank: int = 0xFFFF
    max_values: int = 1 << 28

    def __post_init__(self):
        for name in ("max_batch", "max_time", "max_rank", "max_values"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"WireLimits.{name}={v!r} must be an int >= 1")

    @classmethod
    def for_model(cls, d_model: int, max_seq_len: int, max_batch: int) -> WireLimits:
        """Limits of a reader serving a model: at most ``max_batch`` sequences of
        ``max_seq_len`` tokens of ``d_model`` values (the raw hidden state is the widest
        thing a split sends)."""
        return cls(max_batch=max_batch, max_time=max_seq_len, max_rank=d_model,
                   max_values=max_batch * max_seq_len * d_model)


DEFAULT_LIMITS = WireLimits()


@dataclasses.dataclass(frozen=True)
class Latent:
    """A decoded payload: values [B, T, R] (int8 levels, int32 ids or float32) and scales
    [B, T] (quantised kinds) or None."""

    kind: str
    values: np.ndarray
    scale: np.ndarray | None


def token_bytes(kind: str, rank: int) -> float:
    """Body bytes one token adds to a payload of ``kind`` with ``rank`` values per token.

    int8: a float32 scale and R levels; int4: the scale and R nibbles (R / 2 bytes: nibbles
    pack across tokens, so only a message's last byte may hold padding); float16/bfloat16:
    2 R; float32 and int32: 4 R. The scheduler's cost model and :func:`body_bytes` both use
    it.
    """
    if kind == "int8":
        return 4.0 + rank
    if kind == "int4":
        return 4.0 + rank / 2
    if kind in _FLOAT_DTYPES:
        return float(_FLOAT_DTYPES[kind].itemsize * rank)
    if kind == "int32":
        return 4.0 * rank
    raise WireFormatError(f"unknown latent kind {kind!r}; expected one of {sorted(KINDS)}")


def body_bytes(kind: str, batch: int, time: int, rank: int) -> int:
    """Exact body size of a payload: what the link carries besides the 24-byte header
    (``batch * time`` tokens of :func:`token_bytes`, an odd int4 nibble count padded)."""
    # Every token_bytes value is a multiple of 1/2, so the product is exact in float64.
    return math.ceil(batch * time * token_bytes(kind, rank))


def payload_bytes(kind: str, batch: int, time: int, rank: int) -> int:
    """Exact size of a whole payload: the 24-byte header plus :func:`body_bytes`."""
    return HEADER_BYTES + body_bytes(kind, batch, time, rank)


def _levels(values: np.ndarray, kind: str) -> np.ndarray:
    """Integer levels of a quantised kind, refused (never wrapped) outside its range."""
    top = _LEVELS[kind]
    if values.size and not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise WireFormatError(f"{kind} latents must be whole numbers; got non-integer "
                                  f"or non-finite values (dtype {values.dtype})")
    if values.size and (values.min() < -top or values.max() > top):
        raise WireFormatError(f"{kind} latents must lie in [-{top}, {top}]; got values in "
                              f"[{values.min()}, {values.max()}] (pack never wraps a level)")
    return values.astype(np.int8).reshape(-1)


def _token_ids(values: np.ndarray) -> np.ndarray:
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise WireFormatError(f"int32 payloads carry token ids; got dtype {values.dtype}")
    if values.size and (values.min() < 0 or values.max() > 0x7FFFFFFF):
        raise WireFormatError(f"token ids must lie in [0, 2^31 - 1]; got [{values.min()}, "
                              f"{values.max()}]")
    return values.astype("<i4")


def pack(values: np.ndarray, scale: np.ndarray | None, kind: str) -> bytes:
    """Serialises values [B, T, R] (int8/int4 levels, int32 token ids, or floats) and, for a
    quantised kind, per-token scales <float32>[B, T].

    Raises:
      WireFormatError: a shape outside the header's fields (B, T >= 1 and < 2^32, R in
        [1, 65535]), a level outside [-127, 127] (int8) or [-7, 7] (int4), a non-integral
        level, a negative token id, a negative or non-finite scale, a value that is not finite
        in its kind: anything :func:`unpack` would refuse.
    """
    values = np.asarray(values)
    if values.ndim != 3:
        raise WireFormatError(f"latents must be [B, T, R], got shape {values.shape}")
    b, t, r = values.shape
    if not 1 <= r <= 0xFFFF:
        raise WireFormatError(f"rank={r} must lie in [1, 65535]")
    if not (1 <= b <= _U32 and 1 <= t <= _U32):
        raise WireFormatError(f"B={b}, T={t} must each lie in [1, 2^32 - 1]")
    if kind not in KINDS:
        raise WireFormatError(f"unknown latent kind {kind!r}; expected one of {sorted(KINDS)}")
    parts = []
    if kind in QUANTISED:
        scale = np.asarray(scale, "<f4")
        if scale.shape != (b, t):
            raise WireFormatError(f"scale shape {scale.shape} must be {(b, t)}")
        if not np.all(np.isfinite(scale)) or np.any(scale < 0):
            raise WireFormatError("scale contains NaN, infinity or a negative value; refusing "
                                  "to send it")
        parts.append(scale.tobytes())
        levels = _levels(values, kind)
        if kind == "int4":
            nib = (levels.astype(np.int16) & 0xF).astype(np.uint8)
            if nib.size % 2:
                nib = np.concatenate([nib, np.zeros(1, np.uint8)])
            parts.append((nib[0::2] | (nib[1::2] << 4)).tobytes())
        else:
            parts.append(levels.tobytes())
    elif kind == "int32":
        parts.append(_token_ids(values).tobytes())
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            cast = values.astype(_FLOAT_DTYPES[kind])
        if not np.all(np.isfinite(cast.astype(np.float32))):
            raise WireFormatError(f"latents are not finite as {kind} (NaN, infinity or "
                                  "overflow); refusing to send them")
        parts.append(cast.tobytes())
    body = b"".join(parts)
    if len(body) > _U32:
        raise WireFormatError(f"body of {len(body)} bytes exceeds the format's 2^32 - 1")
    head = HEADER.pack(MAGIC, VERSION, KINDS[kind], r, b, t, len(body), 0)[:_CHECKED]
    crc = google_crc32c.extend(google_crc32c.value(head), body)
    return head + struct.pack("<I", crc) + body


def _check_header(buf: bytes, limits: WireLimits, expected: dict) -> tuple[str, int, int, int]:
    """Validates the header of ``buf`` (and its checksum) without touching the body's values;
    returns (kind, B, T, R)."""
    if len(buf) < HEADER_BYTES:
        raise WireFormatError(f"truncated header: {len(buf)} bytes, need {HEADER_BYTES}")
    magic, version, kind_code, rank, b, t, length, crc = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {magic!r}: not an ec2moe payload (expected {MAGIC!r})")
    if version in RETIRED:
        raise WireFormatError(f"wire {RETIRED[version]} is no longer accepted; this reader "
                              f"speaks version {VERSION} (CRC32C): re-encode with the current "
                              "ec2moe_jax.codec.wire.pack")
    if version != VERSION:
        raise WireFormatError(f"unsupported wire version {version}; this reader speaks "
                              f"{VERSION}")
    if kind_code not in _KIND_NAMES:
        raise WireFormatError(f"unknown latent kind code {kind_code}")
    kind = _KIND_NAMES[kind_code]
    # Declared sizes against the limits first: integer maths on the header, nothing else.
    for name, v, top in (("B", b, limits.max_batch), ("T", t, limits.max_time),
                         ("R", rank, limits.max_rank)):
        if not 1 <= v <= top:
            raise WireFormatError(f"payload declares {name}={v}, outside [1, {top}] "
                                  "(WireLimits)")
    if b * t * rank > limits.max_values:
        raise WireFormatError(f"payload declares B*T*R = {b}*{t}*{rank} = {b * t * rank} "
                              f"values, over the limit of {limits.max_values} (WireLimits)")
    for name, v in (("rank", rank), ("batch", b), ("time", t)):
        want = expected.get(name)
        if want is not None and v != want:
            raise WireFormatError(f"payload {name} {v} does not match the expected {name} "
                                  f"{want}" + (" (the codec's rank)" if name == "rank" else ""))
    need = body_bytes(kind, b, t, rank)
    if length != need:
        raise WireFormatError(f"shape [B={b}, T={t}, R={rank}] of kind {kind} needs {need} "
                              f"body bytes, length field says {length}")
    if length != len(buf) - HEADER_BYTES:
        raise WireFormatError(f"length field says {length} body bytes but "
                              f"{len(buf) - HEADER_BYTES} follow (truncated or padded)")
    got = google_crc32c.extend(google_crc32c.value(buf[:_CHECKED]),
                               buf[HEADER_BYTES:])
    if got != crc:
        raise WireFormatError(f"checksum mismatch (CRC32C {got:#010x}, header says "
                              f"{crc:#010x}): the payload was corrupted in transit")
    return kind, b, t, rank


def unpack(buf: bytes, expected_rank: int | None = None, *, expected_batch: int | None = None,
           expected_time: int | None = None, expected_kind: str | None = None,
           limits: WireLimits = DEFAULT_LIMITS) -> Latent:
    """Parses and validates a payload.

    Args:
      buf: the payload bytes.
      expected_rank, expected_batch, expected_time, expected_kind: what the reader knows it
        must get (None: anything within ``limits``).
      limits: bounds on the declared B, T, R and B*T*R, checked before the body is read.

    Returns:
      A :class:`Latent`: values [B, T, R] (int8 levels, int32 ids, or float32) and scales
      <float32>[B, T] or None.

    Raises:
      WireFormatError: anything amiss (truncation, a retired or unknown version, a declared
        size over the limits or disagreeing with the bytes, a checksum mismatch, an
        unexpected shape or kind, non-finite or out-of-range values); the message names the
        field and value.
    """
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"payload must be bytes, got {type(buf).__name__}")
    buf = bytes(buf)
    kind, b, t, rank = _check_header(buf, limits, {"rank": expected_rank, "batch": expected_batch,
                                                   "time": expected_time})
    if expected_kind is not None and kind != expected_kind:
        raise WireFormatError(f"payload kind {kind} does not match the expected {expected_kind}")
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
    if kind == "int32":
        ids = np.frombuffer(body, "<i4").astype(np.int32).reshape(b, t, rank)
        if np.any(ids < 0):
            raise WireFormatError("int32 payload holds a negative token id")
        return Latent(kind, ids, None)
    values = np.frombuffer(body, _FLOAT_DTYPES[kind]).astype(np.float32).reshape(b, t, rank)
    if not np.all(np.isfinite(values)):
        raise WireFormatError("payload latents contain NaN or infinity")
    return Latent(kind, values, None)
