"""Thin linen modules: they own parameters; the maths lives in pure functions."""

from ec2moe_jax.layers.attention import Attention
from ec2moe_jax.layers.basic import RMSNorm, SwiGLU, rope
from ec2moe_jax.layers.block import DecoderBlock
from ec2moe_jax.layers.moe import MoEBlock, to_groups

__all__ = ["Attention", "DecoderBlock", "MoEBlock", "RMSNorm", "SwiGLU", "rope", "to_groups"]
