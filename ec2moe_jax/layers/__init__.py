"""Thin linen modules: they own parameters; the maths lives in pure functions."""

from ec2moe_jax.layers.attention import Attention
from ec2moe_jax.layers.basic import RMSNorm, SwiGLU, rope
from ec2moe_jax.layers.block import DecoderBlock
from ec2moe_jax.layers.moe import MoEBlock, quantize_experts, quantize_experts_mixed, to_groups
from ec2moe_jax.layers.quant import (
    QuantizedExperts,
    QuantizedWeight,
    QuantSpec,
    quantize,
    quantize_mixed,
)

__all__ = ["Attention", "DecoderBlock", "MoEBlock", "QuantSpec", "QuantizedExperts",
           "QuantizedWeight", "RMSNorm", "SwiGLU", "quantize", "quantize_experts",
           "quantize_experts_mixed", "quantize_mixed", "rope", "to_groups"]
