"""The low-rank link codec: PCA initialisation, latent quantisation, the wire format and the
one codec vocabulary (:class:`CodecSpec`)."""

from ec2moe_jax.codec.lowrank import (
    decode,
    dequantize,
    encode,
    fake_quantize,
    pca_init,
    quantization_bound,
    quantize,
    relative_error,
    roundtrip,
)
from ec2moe_jax.codec.payload import compress, decompress
from ec2moe_jax.codec.spec import BF16, FP32, CodecSpec
from ec2moe_jax.codec.wire import (
    HEADER_BYTES,
    Latent,
    WireFormatError,
    body_bytes,
    pack,
    payload_bytes,
    token_bytes,
    unpack,
)

__all__ = [
    "BF16",
    "HEADER_BYTES",
    "CodecSpec",
    "FP32",
    "Latent",
    "WireFormatError",
    "body_bytes",
    "compress",
    "decode",
    "decompress",
    "dequantize",
    "encode",
    "fake_quantize",
    "pack",
    "payload_bytes",
    "pca_init",
    "quantization_bound",
    "quantize",
    "relative_error",
    "roundtrip",
    "token_bytes",
    "unpack",
]
