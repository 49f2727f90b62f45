"""The HL-GGN group gate as a thin linen module; the maths is in
:mod:`ec2moe_jax.routing.group_gate`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ec2moe_jax.routing.group_gate import group_gate_logits


class GroupGate(nn.Module):
    """``__call__(x [..., D], log_prior [E]) -> logits [..., E]`` for one MoE layer.

    Attributes:
      inputs: the P hidden coordinates the local gate reads (static; see
        :func:`~ec2moe_jax.routing.group_gate.choose_inputs`).
      num_experts: E.
    """

    inputs: tuple[int, ...]
    num_experts: int

    @nn.compact
    def __call__(self, x: jax.Array, log_prior: jax.Array) -> jax.Array:
        p, e = len(self.inputs), self.num_experts
        params = {
            "w_local": self.param("w_local", nn.initializers.zeros, (p, e)),
            "bias": self.param("bias", nn.initializers.zeros, (e,)),
            "temperature": self.param("temperature", nn.initializers.zeros, ()),
            "prior_weight": self.param("prior_weight", nn.initializers.zeros, ()),
        }
        inputs = jnp.asarray(self.inputs, jnp.int32)
        return group_gate_logits(params, x.astype(jnp.float32), inputs,
                                 log_prior.astype(jnp.float32))
