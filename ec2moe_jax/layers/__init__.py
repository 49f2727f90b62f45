"""Thin linen modules: they own parameters; the maths lives in pure functions."""

from ec2moe_jax.layers.attention import Attention
from ec2moe_jax.layers.basic import RMSNorm, SwiGLU, rope
from ec2moe_jax.layers.block import DecoderBlock
from ec2moe_jax.layers.moe import MoEBlock, quantize_experts, to_groups
from ec2moe_jax.layers.quant import QuantizedWeight, QuantSpec, quantize

__all__ = ["Attention", "DecoderBlock", "MoEBlock", "QuantSpec", "QuantizedWeight", "RMSNorm",
           "SwiGLU", "quantize", "quantize_experts", "rope", "to_groups"]
