"""The low-rank codec: identity at full rank, monotone in rank, int8/int4 bounds, the wire
format (round trips, exact sizes, and every malformed payload rejected), fine-tuning."""

import math
import struct
import time

import google_crc32c
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from ec2moe_jax.codec import (
    BF16,
    HEADER_BYTES,
    CodecSpec,
    WireFormatError,
    compress,
    decompress,
    dequantize,
    pack,
    payload_bytes,
    pca_init,
    quantization_bound,
    quantize,
    relative_error,
    roundtrip,
    token_bytes,
    unpack,
)
from ec2moe_jax.codec.wire import WireLimits
from ec2moe_jax.layers.codec import LowRankCodec


def _hidden(n=400, d=16, seed=0):
    rng = np.random.default_rng(seed)
    # Anisotropic data, so principal directions matter (like real residual streams).
    return (rng.normal(size=(n, d)) * np.geomspace(5.0, 0.05, d) + 1.5).astype(np.float32)


def _codec(h, rank):
    p = pca_init(h, rank)
    return {k: jnp.asarray(p[k]) for k in ("mean", "w_enc", "w_dec")}


def test_full_rank_without_quantization_is_identity():
    h = _hidden()
    codec = _codec(h, h.shape[1])
    assert_close(roundtrip(codec, jnp.asarray(h), None), h)
    # The linen module with the same parameters computes the same thing.
    module = LowRankCodec(d_model=16, rank=16, bits=None)
    assert_close(module.apply({"params": codec}, jnp.asarray(h)), h)


def test_reconstruction_error_does_not_increase_with_rank():
    h = _hidden()
    errors = [float(relative_error(h, roundtrip(_codec(h, r), jnp.asarray(h), None)))
              for r in range(1, 17)]
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-5 < errors[0]


@pytest.mark.parametrize("bits,levels", [("int8", 127), ("int4", 7)])
def test_quantization_error_within_its_bound(bits, levels):
    z = jax.random.normal(jax.random.key(0), (5, 7, 24)) * 3
    q, scale = quantize(z, bits)
    assert q.dtype == jnp.int8 and int(jnp.max(jnp.abs(q))) == levels
    err = jnp.abs(dequantize(q, scale) - z)
    assert bool(jnp.all(err <= quantization_bound(scale)[..., None] * (1 + 1e-6)))
    q0, s0 = quantize(jnp.zeros((2, 3)), bits)  # all-zero tokens decode exactly
    assert float(jnp.abs(dequantize(q0, s0)).max()) == 0.0


@pytest.mark.parametrize("bits", ["int8", "int4", None])
def test_payload_round_trip_and_exact_size(bits):
    h = _hidden(n=2 * 9, d=16).reshape(2, 9, 16)
    codec = _codec(h.reshape(-1, 16), 5)
    payload = compress(codec, jnp.asarray(h), bits)
    kind = bits or "float32"
    assert len(payload) == payload_bytes(kind, 2, 9, 5)
    assert len(payload) == HEADER_BYTES + {"int8": 18 * (4 + 5), "int4": 18 * 4 + 45,
                                           None: 18 * 5 * 4}[bits]
    # What the cloud decodes is exactly what evaluation models for this link.
    assert_close(decompress(codec, payload), roundtrip(codec, jnp.asarray(h), bits), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(values=hnp.arrays(np.int8, hnp.array_shapes(min_dims=3, max_dims=3, max_side=5),
                         elements=st.integers(-7, 7)),
       kind=st.sampled_from(["int8", "int4"]))
def test_property_pack_unpack_is_exact(values, kind):
    scale = np.linspace(0.1, 2.0, values.shape[0] * values.shape[1], dtype=np.float32)
    scale = scale.reshape(values.shape[:2])
    latent = unpack(pack(values, scale, kind), expected_rank=values.shape[2])
    np.testing.assert_array_equal(latent.values, values)
    np.testing.assert_array_equal(latent.scale, scale)


def _good_payload():
    return pack(np.ones((1, 3, 4), np.int8), np.ones((1, 3), np.float32), "int8")


_FIELDS = ("magic", "version", "kind", "rank", "b", "t", "length", "crc")


def _with_header(body=None, *, fix_crc=True, **fields):
    """The good payload (or ``body``) under a header with ``fields`` replaced; the checksum
    recomputed unless ``fix_crc`` is False (a forged header, not a corrupted one)."""
    good = _good_payload()
    vals = dict(zip(_FIELDS, struct.unpack_from("<4sBBHIIII", good), strict=True))
    vals.update(fields)
    body = good[HEADER_BYTES:] if body is None else body
    head = struct.pack("<4sBBHIIII", *vals.values())
    if fix_crc and "crc" not in fields:
        crc = google_crc32c.extend(google_crc32c.value(head[:20]), body)
        head = head[:20] + struct.pack("<I", crc)
    return head + body


def _with_scale(value):
    # A forged payload: the bad scale under a valid checksum, so the value check is reached.
    body = bytearray(_good_payload()[HEADER_BYTES:])
    body[:4] = struct.pack("<f", value)
    return _with_header(bytes(body))


@pytest.mark.parametrize("payload,match", [
    (b"", "truncated header: 0 bytes"),
    (_good_payload()[:10], "truncated header"),
    (_good_payload()[:-1], "length field says 24 body bytes but 23 follow"),
    (_good_payload() + b"\0", "but 25 follow"),
    (_with_header(magic=b"NOPE"), "bad magic"),
    (_with_header(version=3), "unsupported wire version 3"),
    (_with_header(kind=9), "unknown latent kind code 9"),
    (_with_header(rank=5), "payload rank 5 does not match the expected rank 4"),
    (_with_header(t=4), r"shape \[B=1, T=4, R=4\] of kind int8 needs 32"),
    (_with_header(length=2**31), "length field says 2147483648"),
    (_with_header(crc=12345), "checksum mismatch"),
    (_with_scale(float("nan")), "NaN"),
    (_with_scale(float("inf")), "infinity"),
    (_with_scale(-1.0), "negative"),
    ("not bytes", "payload must be bytes"),
])
def test_malformed_payloads_are_rejected_clearly(payload, match):
    with pytest.raises(WireFormatError, match=match):
        unpack(payload, expected_rank=4)


def test_the_retired_version_is_refused_by_name():
    # A version-1 payload (24-byte header: magic, version 1, kind, rank, B, T, uint64 length,
    # no checksum), exactly as the old writer produced it.
    old = struct.pack("<4sBBHIIQ", b"EC2W", 1, 1, 4, 1, 3, 24) + _good_payload()[HEADER_BYTES:]
    with pytest.raises(WireFormatError, match=r"wire version 1 \(no checksum.*re-encode"):
        unpack(old, expected_rank=4)


def test_a_header_with_b_and_t_swapped_is_refused():
    # [B=1, T=3] and [B=3, T=1] need the same body: the swap is caught by the checksum (the
    # header is covered), and by the expected shape when the reader knows it.
    with pytest.raises(WireFormatError, match="checksum mismatch"):
        unpack(_with_header(b=3, t=1, fix_crc=False), expected_rank=4)
    with pytest.raises(WireFormatError, match="payload batch 3 does not match the expected "
                                              "batch 1"):
        unpack(_with_header(b=3, t=1), expected_rank=4, expected_batch=1)
    with pytest.raises(WireFormatError, match="payload time 3 does not match the expected "
                                              "time 1"):
        unpack(_good_payload(), expected_rank=4, expected_time=1)


def test_oversized_declarations_are_refused_at_once():
    # 24 bytes declaring B = 2^32 - 1, T = 0 (an empty body): once it made decompress spend
    # 14 s; now the declared sizes meet the limits before any allocation or loop.
    huge = _with_header(b"", b=2**32 - 1, t=0, length=0)
    assert len(huge) == 24
    for payload, match in ((huge, "B=4294967295, outside"),
                           (_with_header(b"", b=1, t=0, length=0), "T=0, outside"),
                           (_with_header(b"", b=2**16, t=2**16, rank=2**16 - 1, length=0),
                            "B=65536, outside")):
        t0 = time.perf_counter()
        for _ in range(100):
            with pytest.raises(WireFormatError, match=match):
                unpack(payload)
        assert (time.perf_counter() - t0) / 100 < 1e-3  # microseconds each, not seconds
    limits = WireLimits(max_batch=8, max_time=64, max_rank=32, max_values=8 * 64 * 16)
    with pytest.raises(WireFormatError, match=r"B\*T\*R = 8\*64\*32 = 16384 values, over"):
        unpack(_with_header(b"", b=8, t=64, rank=32, length=0), limits=limits)
    assert WireLimits.for_model(32, 64, 4).max_values == 4 * 64 * 32
    with pytest.raises(ValueError, match="max_batch=0"):
        WireLimits(max_batch=0)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), kind=st.sampled_from(["int8", "int4", "float32", "bfloat16", "int32"]))
def test_property_every_bit_flip_is_detected(data, kind):
    # Any single bit flip anywhere (header or body) of a valid payload is refused: by the
    # checksum, or earlier by a header check the flip broke.
    b, t, r = data.draw(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 6)))
    if kind in ("int8", "int4"):
        top = 127 if kind == "int8" else 7
        values = data.draw(hnp.arrays(np.int8, (b, t, r), elements=st.integers(-top, top)))
        buf = pack(values, np.full((b, t), 0.5, np.float32), kind)
    elif kind == "int32":
        buf = pack(data.draw(hnp.arrays(np.int32, (b, t, r),
                                        elements=st.integers(0, 255))), None, kind)
    else:
        buf = pack(data.draw(hnp.arrays(np.float32, (b, t, r), elements=st.floats(-4, 4,
                                                                          width=32))),
                   None, kind)
    unpack(buf)  # the payload itself is valid
    bit = data.draw(st.integers(0, 8 * len(buf) - 1))
    flipped = bytearray(buf)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(WireFormatError):
        unpack(bytes(flipped))


def test_pack_refuses_what_unpack_would_refuse():
    # int8 200 once wrapped to -56; int4 beyond 7, a -128 level, a fractional level, a
    # negative scale and a negative token id are refused too, never written.
    one = np.ones((1, 1), np.float32)
    for values, kind, match in ((np.full((1, 1, 2), 200), "int8", r"\[-127, 127\].*200"),
                                (np.full((1, 1, 2), -128), "int8", r"\[-127, 127\]"),
                                (np.full((1, 1, 2), 8), "int4", r"\[-7, 7\]"),
                                (np.full((1, 1, 2), 1.5), "int8", "whole numbers")):
        with pytest.raises(WireFormatError, match=match):
            pack(values, one, kind)
    with pytest.raises(WireFormatError, match="negative"):
        pack(np.ones((1, 1, 2), np.int8), -one, "int8")
    with pytest.raises(WireFormatError, match="token ids must lie"):
        pack(np.full((1, 1, 1), -1, np.int32), None, "int32")
    ids = np.arange(6, dtype=np.int32).reshape(2, 3, 1)
    np.testing.assert_array_equal(unpack(pack(ids, None, "int32")).values, ids)
    assert len(pack(ids, None, "int32")) == payload_bytes("int32", 2, 3, 1) == 24 + 6 * 4


def test_non_finite_and_out_of_range_values_are_refused():
    h = _hidden(n=4, d=16).reshape(1, 4, 16)
    codec = _codec(_hidden(), 5)
    h[0, 1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        compress(codec, jnp.asarray(h), "int8")
    with pytest.raises(WireFormatError, match="not finite as float16"):
        pack(np.full((1, 1, 2), 1e6, np.float32), None, "float16")
    body = bytearray(_good_payload()[HEADER_BYTES:])
    body[-1] = 0x80  # int8 -128 under a valid checksum
    with pytest.raises(WireFormatError, match="-128"):
        unpack(_with_header(bytes(body)), expected_rank=4)
    odd = pack(np.ones((1, 1, 3), np.int8), np.ones((1, 1), np.float32), "int4")
    body = bytearray(odd[HEADER_BYTES:])
    body[-1] |= 0x10  # the unused high nibble of the last byte
    with pytest.raises(WireFormatError, match="padding nibble"):
        unpack(_with_header(bytes(body), kind=2, rank=3, t=1, length=len(body)),
               expected_rank=3)


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "float32"])
def test_float_payloads_round_trip_at_their_precision(kind):
    values = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
    buf = pack(values, None, kind)
    assert len(buf) == payload_bytes(kind, 2, 3, 5)
    got = unpack(buf, expected_rank=5)
    # float32 is exact; the 2-byte kinds round to 11 (float16) or 8 (bfloat16) bits.
    rtol = {"float32": 0.0, "float16": 2**-11, "bfloat16": 2**-8}[kind]
    np.testing.assert_allclose(got.values, values, rtol=rtol, atol=0)
    assert got.kind == kind and got.scale is None


def test_body_size_is_tokens_times_token_bytes():
    # One size formula: body = ceil(B T token_bytes); int4 nibbles pack across tokens, so
    # only the message's last byte may be padding.
    assert token_bytes("int4", 64) == 36 and token_bytes("int4", 3) == 5.5
    assert payload_bytes("int4", 1, 3, 3) == HEADER_BYTES + 12 + 5  # 9 nibbles -> 5 bytes
    for kind in ("int8", "int4", "float16", "bfloat16", "float32"):
        for b, t, r in ((1, 1, 1), (2, 3, 5), (4, 7, 64)):
            assert payload_bytes(kind, b, t, r) - HEADER_BYTES == math.ceil(
                b * t * token_bytes(kind, r))


def test_codec_spec_names_round_trip_and_size_real_payloads():
    for name in ("bf16", "fp32", "int8-r64", "int4-r96", "fp32-r64"):
        assert CodecSpec.parse(name).name == name
    assert CodecSpec.parse("none") == BF16  # what plans and results said before the rename
    for bad, match in (("float32", "now called 'fp32'"), ("lowrank-float32", "fp32-r<rank>"),
                       ("int8", "needs a rank"), ("bf16-r8", "low-rank latents travel as"),
                       ("int8-r0", "rank=0"), ("fp8-r4", "unknown codec 'fp8-r4'")):
        with pytest.raises(ValueError, match=match):
            CodecSpec.parse(bad)
    with pytest.raises(ValueError, match="exceeds the model width"):
        CodecSpec("int8", 17).check(16)
    h = _hidden(n=2 * 5, d=16).reshape(2, 5, 16)
    codec = _codec(h.reshape(-1, 16), 7)
    for spec in (CodecSpec("int8", 7), CodecSpec("int4", 7), CodecSpec("fp32", 7)):
        payload = compress(codec, jnp.asarray(h), spec.quant_bits)
        assert spec.payload_bytes(2, 5, 16) == len(payload), spec.name
        assert spec.bytes_per_token(16) * 10 + HEADER_BYTES == pytest.approx(len(payload), abs=1)
    for spec in (BF16, CodecSpec("fp32")):  # the raw hidden state: D values per token
        assert spec.payload_bytes(2, 5, 16) == len(pack(h, None, spec.wire_kind))


def test_pack_refuses_bad_input():
    with pytest.raises(WireFormatError, match="NaN, infinity"):
        pack(np.ones((1, 1, 2), np.int8), np.array([[np.nan]], np.float32), "int8")
    with pytest.raises(WireFormatError, match=r"\[B, T, R\]"):
        pack(np.ones((2, 2), np.int8), None, "int8")
    with pytest.raises(ValueError, match="rank=17"):
        pca_init(_hidden(), 17)


def test_finetuning_reduces_kl_and_checkpoint_round_trips(tiny_cfg, fixture_splits, tmp_path):
    from ec2moe_jax.models import MoELM, init_params
    from ec2moe_jax.sharding import unbox
    from ec2moe_jax.training.codec import (
        collect_hidden,
        finetune_codec,
        load_codec,
        make_codec_loss,
        split_bits_per_char,
    )
    from ec2moe_jax.training.steps import bits_per_char, make_eval_step

    model = MoELM(tiny_cfg.model)
    params = unbox(init_params(model, jax.random.key(0)))
    h = collect_hidden(model, params, fixture_splits.train, 1, batches=2, batch_size=8,
                       seq_len=32)
    assert h.shape == (2 * 8 * 32, 32)
    # Start from a random (not PCA) rank-4 codec so there is plenty to learn.
    init = LowRankCodec(d_model=32, rank=4).init(jax.random.key(1), jnp.zeros((1, 32)))["params"]
    loss = jax.jit(make_codec_loss(model, 1, "int8"))
    fixed = jnp.asarray(fixture_splits.val[: 4 * 32].reshape(4, 32), jnp.int32)
    codec, history = finetune_codec(model, params, init, fixture_splits.train, 1, bits="int8",
                                    steps=40, batch_size=4, seq_len=32, learning_rate=1e-2,
                                    checkpoint_dir=str(tmp_path / "codec"), progress=False)
    assert float(loss(codec, params, fixed)[0]) < 0.8 * float(loss(init, params, fixed)[0])
    restored = load_codec(str(tmp_path / "codec"), d_model=32, rank=4)
    assert_close(restored["w_enc"], codec["w_enc"])
    # With no transform the split evaluation equals the plain model's.
    ev = jax.jit(make_eval_step(model))
    plain = bits_per_char(ev, params, fixture_splits.test, batch_size=4, seq_len=32)
    split = split_bits_per_char(model, params, fixture_splits.test, 1, None, batch_size=4,
                                seq_len=32)
    assert split == pytest.approx(plain, rel=1e-5)
