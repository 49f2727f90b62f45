"""The HL-GGN group gate as a thin linen module (the maths is in
:mod:`ec2moe_jax.routing.group_gate`), the static description of an end device's gates, and
their construction as the gate callables :meth:`~ec2moe_jax.models.MoELM.layers` takes.

Shape legend: D model, E experts, L layers, P gate inputs, G groups, S tokens per group.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.routing import group_gate as gg
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


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """The static part of an end device's gates.

    Attributes:
      allowed: <bool>[L, E] routing mask of the split model (``Selection.allowed``).
      num_end_layers: layers ``[0, num_end_layers)`` run on the end.
      layers: the end MoE layers (each has a gate).
      inputs: per gated layer, the P hidden coordinates its local gate reads.
      log_prior: <float32>[L, E] log routing frequency of each expert (global router).
    """

    allowed: np.ndarray
    num_end_layers: int
    layers: tuple[int, ...]
    inputs: tuple[tuple[int, ...], ...]
    log_prior: np.ndarray

    def flops_ratio(self, d_model: int) -> float:
        """Gate FLOPs per token over the full router's, summed over the gated layers."""
        e = self.allowed.shape[1]
        gate = sum(gg.gate_flops(len(p), int(self.allowed[i].sum()))
                   for i, p in zip(self.layers, self.inputs, strict=True))
        return gate / (len(self.layers) * gg.router_flops(d_model, e))


@dataclasses.dataclass
class GateRecorder:
    """Router and gate logits [G, S, E] per gated layer, recorded while one trace runs the
    layers (for distillation and recall)."""

    router_logits: dict[int, jax.Array] = dataclasses.field(default_factory=dict)
    gate_logits: dict[int, jax.Array] = dataclasses.field(default_factory=dict)


def make_gates(model, spec: GateSpec, gate_params: dict,
               recorder: GateRecorder | None = None) -> dict[int, Callable]:
    """Layer index -> gate callable ``gate(x [G, S, D], router [D, E]) -> logits [G, S, E]``
    for :meth:`~ec2moe_jax.models.MoELM.layers` (``gates=``), one per gated end layer.

    Args:
      model: the :class:`~ec2moe_jax.models.MoELM` (only ``model.cfg`` is read).
      spec: the gates' static description.
      gate_params: ``{f"layer_{i}": GroupGate params}`` (traced: new values never recompile).
      recorder: when given, each call stores the router's and the gate's logits in it.
    """
    e = model.cfg.moe.num_experts

    def gate_for(i: int, inputs: tuple[int, ...]):
        module = GroupGate(inputs, e)

        def gate(x, router):
            logits = module.apply({"params": gate_params[f"layer_{i}"]}, x,
                                  jnp.asarray(spec.log_prior[i]))
            if recorder is not None:
                recorder.router_logits[i] = x @ router
                recorder.gate_logits[i] = logits
            return logits

        return gate

    return {i: gate_for(i, p) for i, p in zip(spec.layers, spec.inputs, strict=True)}
