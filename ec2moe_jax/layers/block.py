"""A pre-norm decoder block: attention then a dense or MoE feed-forward."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ec2moe_jax.config import ModelConfig
from ec2moe_jax.layers.attention import Attention
from ec2moe_jax.layers.basic import RMSNorm, SwiGLU
from ec2moe_jax.layers.moe import MoEBlock
from ec2moe_jax.routing.topk import Route


class DecoderBlock(nn.Module):
    """``x + attn(norm(x))`` then ``h + ffn(norm(h))``; returns the Route of a MoE layer."""

    cfg: ModelConfig
    moe: bool
    window: int | None = None  # this layer's attention window (ModelConfig.window)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        *,
        deterministic: bool = True,
        decode: bool = False,
        allowed: jax.Array | None = None,
        gate: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    ) -> tuple[jax.Array, Route | None]:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        # GraniteMoE scales each residual branch (residual_multiplier; 1.0 elsewhere).
        mult = cfg.residual_multiplier
        a = Attention(cfg, self.window, name="attn")(
            RMSNorm(cfg.norm_eps, name="attn_norm")(x), positions, decode)
        h = x + (a if mult == 1.0 else a * mult)
        y = RMSNorm(cfg.norm_eps, name="ffn_norm")(h)
        if self.moe:
            y, route = MoEBlock(cfg.moe, dtype=dtype, name="moe")(y, deterministic, allowed, gate)
        else:
            y, route = SwiGLU(cfg.d_ff, dtype=dtype, name="mlp")(y), None
        y = y.astype(h.dtype)
        return h + (y if mult == 1.0 else y * mult), route
