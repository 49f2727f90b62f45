"""What the end client and the cloud server agree on: the gRPC messages (``ec2moe.proto``),
tensors as wire payloads, the message-size limit, keepalive, authentication, fingerprints.

Shape legend: B batch, T time, D model, R values per token (codec rank, or D), V vocab.

A boundary state (:class:`~ec2moe_jax.pipeline.engine.Message` payload) travels as one
:mod:`~ec2moe_jax.codec.wire` payload: ``{"h": [B, T, D]}`` as bfloat16 or float32,
``{"q": <int8>[B, T, R], "scale": [B, T]}`` as int8 or int4, ``{"z": [B, T, R]}`` as float32,
token ids <int32>[B, T] as kind int32 [B, T, 1]. :func:`decode_state` is the inverse and
gives the arrays the cloud stage takes, with the dtypes the in-process pipeline gives it (so
a remote step computes what a local one does). Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import hmac

import grpc
import ml_dtypes
import numpy as np

from ec2moe_jax.codec import CodecSpec, wire
from ec2moe_jax.serving import ec2moe_pb2 as pb
from ec2moe_jax.serving import ec2moe_pb2_grpc as pb_grpc

__all__ = ["AUTH_KEY", "pb", "pb_grpc"]

AUTH_KEY = "authorization"  # gRPC metadata key of the shared token ("Bearer <token>")
_SLACK = 64 * 1024  # protobuf framing and the other fields of the largest message
KEEPALIVE = {  # both sides ping every 10 s; a peer silent for 5 s more is gone
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
}
SERVER_PINGS = {  # what a server accepts: pings every 5 s (the default refuses < 5 min)
    "grpc.http2.min_recv_ping_interval_without_data_ms": 5_000,
    "grpc.http2.max_ping_strikes": 0,
}


def message_limit(d_model: int, max_seq_len: int, max_score_batch: int) -> int:
    """Bytes of the largest legitimate message: a scoring request of ``max_score_batch``
    rows of ``max_seq_len`` positions of the raw float32 hidden state plus its target ids
    (prefill messages are one row, so smaller), plus framing. Both sides size
    ``max_{send,receive}_message_length`` with it, not gRPC's 4 MiB default."""
    state = wire.payload_bytes("float32", max_score_batch, max_seq_len, d_model)
    targets = wire.payload_bytes("int32", max_score_batch, max_seq_len, 1)
    return state + targets + _SLACK


def channel_options(limit: int, *, server: bool = False) -> list[tuple[str, int]]:
    """gRPC options of a client channel (or a server): message sizes and keepalive."""
    extra = SERVER_PINGS.items() if server else ()
    return [("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit), *KEEPALIVE.items(), *extra]


def encode_state(payload, spec: CodecSpec | None) -> bytes:
    """A boundary state (an end stage's output, or token ids <int32>[B, T] when ``spec`` is
    None: split 0) -> one wire payload.

    Raises:
      WireFormatError: values the wire refuses (non-finite, out of range).
    """
    if spec is None:
        return wire.pack(np.asarray(payload, np.int32)[..., None], None, "int32")
    if "h" in payload:
        return wire.pack(np.asarray(payload["h"]), None, spec.wire_kind)
    if "z" in payload:
        return wire.pack(np.asarray(payload["z"], np.float32), None, "float32")
    return wire.pack(np.asarray(payload["q"]), np.asarray(payload["scale"]), spec.wire_kind)


def decode_state(buf: bytes, spec: CodecSpec | None, *, d_model: int, vocab_size: int,
                 batch: int | None, time: int | None, limits: wire.WireLimits):
    """The inverse of :func:`encode_state`, checked against what the reader expects.

    Args:
      spec: the session's codec (None: token ids, split 0).
      batch, time: the expected B and T (None: any within ``limits``).

    Returns:
      The stage's message: ids <int32>[B, T], or ``{"h"}``, ``{"z"}``, ``{"q", "scale"}``
      numpy arrays in the dtypes the end stage produces.

    Raises:
      WireFormatError: a malformed payload, another kind or shape than the session's, token
        ids outside the vocabulary.
    """
    if spec is None:
        lat = wire.unpack(buf, 1, expected_batch=batch, expected_time=time,
                          expected_kind="int32", limits=limits)
        ids = lat.values[..., 0]
        if ids.size and ids.max() >= vocab_size:
            raise wire.WireFormatError(f"token id {int(ids.max())} outside the vocabulary "
                                       f"[0, {vocab_size})")
        return ids
    kind = spec.wire_kind if spec.quant_bits or not spec.lowrank else "float32"
    lat = wire.unpack(buf, spec.width(d_model), expected_batch=batch, expected_time=time,
                      expected_kind=kind, limits=limits)
    if not spec.lowrank:
        dtype = ml_dtypes.bfloat16 if spec.kind == "bf16" else np.float32
        return {"h": lat.values.astype(dtype)}
    if spec.quant_bits is None:
        return {"z": lat.values}
    return {"q": lat.values, "scale": lat.scale}


def codec_fingerprint(codec: dict | None) -> str:
    """The identity of a link codec's weights (both halves: the end encodes with ``mean`` and
    ``w_enc``, the cloud decodes with ``mean`` and ``w_dec``; both sides load all three), or
    "" without one: SHA-256 of the arrays in name order."""
    if codec is None:
        return ""
    digest = hashlib.sha256()
    for name in sorted(k for k in codec if k in ("mean", "w_enc", "w_dec")):
        a = np.ascontiguousarray(np.asarray(codec[name], np.float32))
        digest.update(f"{name}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return "sha256:" + digest.hexdigest()[:32]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the shared ``token``."""
    return ((AUTH_KEY, f"Bearer {token}"),)


def token_matches(metadata, token: str) -> bool:
    """Whether call ``metadata`` (pairs) carries ``token``; constant-time comparison."""
    for key, value in metadata or ():
        if key == AUTH_KEY and isinstance(value, str) and value.startswith("Bearer "):
            return hmac.compare_digest(value[7:].encode(), token.encode())
    return False


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses a call without the shared token before its handler runs: the request bytes
    are never deserialised, so no tensor is read. Health checks need no token."""

    def __init__(self, token: str):
        self.token = token

        async def deny_unary(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong shared token (metadata 'authorization: "
                                "Bearer <token>')")

        async def deny_stream(request_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong shared token (metadata 'authorization: "
                                "Bearer <token>')")
            yield  # an async generator, as the stream handler it replaces

        self._unary = grpc.unary_unary_rpc_method_handler(deny_unary)
        self._stream = grpc.stream_stream_rpc_method_handler(deny_stream)

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.") or token_matches(
                details.invocation_metadata, self.token):
            return await continuation(details)
        return self._stream if details.method.endswith("/Decode") else self._unary


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` stays on this machine (127.0.0.0/8, ::1, localhost)."""
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def plan_message(split: int, codec: str) -> pb.Plan:
    return pb.Plan(split=split, codec=codec)


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND,
             grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
"""Statuses after which a client reconnects and replays (a lost link, a restarted server
that no longer knows the session, a server that crashed mid-call)."""
