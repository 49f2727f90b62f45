"""The low-rank link codec: PCA initialisation, latent quantisation, the wire format."""

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
from ec2moe_jax.codec.wire import (
    HEADER_BYTES,
    Latent,
    WireFormatError,
    body_bytes,
    pack,
    payload_bytes,
    unpack,
)

__all__ = [
    "HEADER_BYTES",
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
    "unpack",
]
