"""The MoE block: router, stacked SwiGLU experts [E, D, F], optional shared expert.

Shape legend: B batch, T time, G groups, S tokens per group, D model, F expert hidden,
E experts, K top-k.

The module only owns parameters; routing (:mod:`ec2moe_jax.routing.topk`) and dispatch
(:mod:`ec2moe_jax.routing.dispatch`) are pure functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax import kernels
from ec2moe_jax.config import MoEConfig
from ec2moe_jax.layers.basic import SwiGLU, default_init, dense, param_with_axes
from ec2moe_jax.layers.quant import QuantSpec, quantize, quantize_mixed
from ec2moe_jax.routing import dispatch as dispatch_lib
from ec2moe_jax.routing.topk import Route, top_k_route
from ec2moe_jax.sharding import active_mesh, unbox


def to_groups(x: jax.Array, group_size: int | None) -> jax.Array:
    """[B, T, D] -> [G, S, D]: one group per sequence, or fixed-size groups of tokens."""
    b, t, d = x.shape
    if group_size is None:
        return x
    if (b * t) % group_size:
        raise ValueError(f"{group_size=} does not divide the {b * t} tokens of a [{b}, {t}] "
                         "batch; choose a divisor or group_size=None")
    return x.reshape(b * t // group_size, group_size, d)



# The decode-shaped path (:func:`~ec2moe_jax.routing.dispatch.gathered_moe`, one expert
# matmul per choice) replaces the configured dispatch when the B*T*K choices number at most
# this fraction of E: the capacity-slot dispatches compute every expert's slots, so they
# cost about E expert passes whatever the token count, the gathered path about 2-3 expert
# passes per choice on XLA:CPU (it copies each chosen expert's matrices). Measured on this
# CPU (2 cores), one MoE layer, D=512, ms per call, einsum dispatch vs gathered:
# E=128 K=8 F=192: B=1 17.0 vs 1.1, B=8 31.3 vs 14.3; E=16 K=4 F=1024: B=1 5.0 vs 3.3;
# E=16 K=4 F=256: B=1 1.09 vs 1.05, B=4 1.4 vs 4.1. Not on a mesh whose 'expert' axis
# shards the experts: slicing one expert out of sharded weights all-gathers them every step
# (the split pipeline's cloud step, small config: 11 ms against 4-8 ms with the dispatch).
DECODE_CHOICES_PER_EXPERT = 0.5


def uses_gathered(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether a MoE block of ``num_experts`` runs ``tokens`` through the decode-shaped path
    (at trace time: inside :func:`~ec2moe_jax.sharding.use_mesh` it also asks the mesh)."""
    mesh = active_mesh()
    if mesh is not None and mesh.shape.get("expert", 1) > 1:
        return False
    return tokens * top_k <= DECODE_CHOICES_PER_EXPERT * num_experts


# The prefill-shaped path (:func:`~ec2moe_jax.routing.dispatch.looped_moe`: the choices
# sorted by expert, a loop over chunks of 8 rows with each expert's own buffers) replaces
# the capacity-slot dispatch of per-expert buffers when the B*T*K choices number at most
# this many per expert: the slot dispatches compute all E experts on C slots each (dropless:
# C = every token), the loop reads each chosen expert once per chunk of its tokens.
LOOPED_CHOICES_PER_EXPERT = 16


def uses_looped(tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether per-expert buffers (:func:`unstack_experts`) run ``tokens`` through the
    prefill-shaped path (few tokens, but more than a decode step's)."""
    return tokens * top_k <= LOOPED_CHOICES_PER_EXPERT * num_experts


def _expert_matmul(a: jax.Array, w: jax.Array) -> jax.Array:
    """[E, N, D] x [E, D, F] -> [E, N, F]: every expert's tokens through its own weight."""
    return jnp.einsum("end,edf->enf", a, w)


def oss_swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array,
               b_gate: jax.Array, b_up: jax.Array, b_down: jax.Array, *,
               alpha: float = 1.702, limit: float = 7.0,
               matmul=kernels.matmul) -> jax.Array:
    """GPT-OSS's expert: ``g = x W_g + b_g`` clamped to ``<= limit``, ``u = x W_u + b_u``
    clamped to ``[-limit, limit]``, ``(g * sigmoid(alpha g) * (u + 1)) W_d + b_d``
    (transformers' ``GptOssExperts._apply_gate``; OpenAI's gpt-oss ``swiglu``).

    Shapes follow ``matmul`` as in :func:`~ec2moe_jax.routing.dispatch.swiglu`: one token
    ``x [1, D]`` with ``W [D, F]`` and ``b [F]``, or stacked experts ``[E, N, D]`` with
    ``W [E, D, F]`` and ``b [E, F]``.
    """
    def bias(y, b):  # b [..., F] over y [..., N, F]: one bias row per expert
        return y + b.reshape(*b.shape[:-1], *(1,) * (y.ndim - b.ndim), b.shape[-1])

    g = jnp.minimum(bias(matmul(x, w_gate), b_gate), limit)
    u = jnp.clip(bias(matmul(x, w_up), b_up), -limit, limit)
    h = g * jax.nn.sigmoid(alpha * g) * (u + 1)
    return bias(matmul(h, w_down), b_down)


class MoEBlock(nn.Module):
    """Top-k routed SwiGLU experts (plus an optional shared expert).

    ``__call__(x [B, T, D], deterministic, allowed, gate) -> (y [B, T, D], Route)``;
    ``allowed`` is a <bool>[E] mask of experts that may be chosen (hardware-aware selection
    uses it). Few tokens (a decode step: ``uses_gathered``) take the decode-shaped path,
    which computes only the chosen experts; with one buffer per expert (``unstack_experts``)
    a prompt's tokens (``uses_looped``) take the prefill-shaped loop over chosen experts;
    otherwise ``cfg.dispatch``. ``gate``, if given,
    replaces the router: ``gate(x [G, S, D] float32, router
    [D, E]) -> logits [G, S, E]`` (the HL-GGN group gate on an end device). Routing, top-k
    among allowed experts and renormalisation stay the same.
    """

    cfg: MoEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        deterministic: bool = True,
        allowed: jax.Array | None = None,
        gate: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    ) -> tuple[jax.Array, Route]:
        cfg = self.cfg
        b, t, d = x.shape
        e, f = cfg.num_experts, cfg.expert_dim
        router = self.param("router", param_with_axes(default_init, ("embed", None)), (d, e))
        if self.has_variable("params", UNSTACKED):  # one buffer per expert: unstack_experts
            wg, wu, wd = (self.get_variable("params", UNSTACKED)[k]
                          for k in ("w_gate", "w_up", "w_down"))
        elif self.has_variable("params", QUANTIZED):  # int8/int4 experts: quantize_experts
            wg, wu, wd = (self.get_variable("params", QUANTIZED)[k].dequantize(self.dtype)
                          for k in ("w_gate", "w_up", "w_down"))
        else:
            wg = self.param("w_gate", param_with_axes(
                default_init, ("expert", "embed", "expert_mlp")), (e, d, f))
            wu = self.param("w_up", param_with_axes(
                default_init, ("expert", "embed", "expert_mlp")), (e, d, f))
            wd = self.param("w_down", param_with_axes(
                default_init, ("expert", "expert_mlp", "embed")), (e, f, d))

        factor = cfg.eval_capacity_factor if deterministic else cfg.capacity_factor
        if cfg.dispatch == "ragged":
            factor = None
        group = cfg.group_size
        if factor is None and group and (b * t) % group:
            group = None  # dropless routing is per token: grouping (e.g. decode steps) is moot
        xg = to_groups(x, group)
        # Router maths in float32 whatever the activation dtype.
        if gate is None:
            logits = dense(xg.astype(jnp.float32), router.astype(jnp.float32))
        else:
            logits = gate(xg.astype(jnp.float32), router.astype(jnp.float32))
        if cfg.router_bias:  # GPT-OSS: chosen and weighted on the biased logits
            logits = logits + self.param("router_bias", param_with_axes(
                nn.initializers.zeros, (None,)), (e,)).astype(jnp.float32)
        # A gate's weights are its own softmax over the chosen experts: always renormalised.
        route = top_k_route(logits, top_k=cfg.top_k, capacity_factor=factor,
                            renormalize=cfg.renormalize or gate is not None, allowed=allowed)

        xg = xg.astype(self.dtype)
        ws = [_cast(w, self.dtype) for w in (wg, wu, wd)]
        biases = self._biases(d, f)
        ffn = dispatch_lib.swiglu
        if cfg.expert_act == "swiglu_oss":
            ffn = functools.partial(oss_swiglu, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
        if uses_gathered(b * t, cfg.top_k, e):
            y = dispatch_lib.gathered_moe(xg, route, *ws, extra=biases, ffn=ffn)
        elif isinstance(wg, (tuple, list)) and uses_looped(b * t, cfg.top_k, e):
            y = dispatch_lib.looped_moe(xg, route, *ws, extra=biases, ffn=ffn)
        elif cfg.dispatch == "ragged":  # MoEConfig.validate keeps it to plain SwiGLU
            y = dispatch_lib.ragged_moe(xg, route, *ws)
        elif isinstance(wg, (tuple, list)):  # one buffer per expert: one matmul each
            def experts(xe):  # [E, N, D] -> [E, N, D]
                return jnp.stack([ffn(xe[i], *(w[i] for w in (*ws, *biases)))
                                  for i in range(e)])

            impl = {"einsum": dispatch_lib.einsum_moe, "gather": dispatch_lib.gather_moe}
            y = impl[cfg.dispatch](xg, route, experts)
        else:
            def experts(xe):  # [E, N, D] -> [E, N, D], one batched matmul per weight
                return ffn(xe, *ws, *biases, matmul=_expert_matmul)

            impl = {"einsum": dispatch_lib.einsum_moe, "gather": dispatch_lib.gather_moe}
            y = impl[cfg.dispatch](xg, route, experts)
        y = y.reshape(b, t, d)

        if cfg.shared_expert_dim:
            shared = SwiGLU(cfg.shared_expert_dim, dtype=self.dtype, name="shared_expert")(x)
            if cfg.shared_expert_gate:
                gate = self.param("shared_gate", param_with_axes(default_init, ("embed", None)),
                                  (d, 1))
                gate_value = dense(x.astype(self.dtype), gate.astype(self.dtype))
                shared = shared * jax.nn.sigmoid(gate_value)
            y = y + shared
        return y, route

    def _biases(self, d: int, f: int) -> tuple:
        """``(b_gate [E, F], b_up [E, F], b_down [E, D])`` with ``expert_bias``, else ()."""
        if not self.cfg.expert_bias:
            return ()
        if self.has_variable("params", UNSTACKED):
            return tuple(_cast(self.get_variable("params", UNSTACKED)[k], self.dtype)
                         for k in ("b_gate", "b_up", "b_down"))
        e = self.cfg.num_experts
        return tuple(_cast(self.param(name, param_with_axes(nn.initializers.zeros, axes),
                                      shape), self.dtype)
                     for name, axes, shape in (
                         ("b_gate", ("expert", "expert_mlp"), (e, f)),
                         ("b_up", ("expert", "expert_mlp"), (e, f)),
                         ("b_down", ("expert", "embed"), (e, d))))


def _cast(w, dtype):
    """An expert weight (stacked [E, ...] or one buffer per expert) in ``dtype``."""
    if isinstance(w, (tuple, list)):
        return tuple(a.astype(dtype) for a in w)
    return w.astype(dtype)


EXPERT_PARAMS = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
UNSTACKED = "experts"  # the per-expert buffers' key in a MoEBlock's params
QUANTIZED = "experts_quantized"  # the quantised expert weights' key in a MoEBlock's params
_WEIGHTS = ("w_gate", "w_up", "w_down")


def _is_moe_block(tree) -> bool:
    return isinstance(tree, dict) and "w_gate" in tree and "router" in tree


def quantize_experts(params, spec: QuantSpec, layers: range | None = None, search: bool = True):
    """``params`` with the routed expert weights of the MoE layers in ``layers`` (default:
    all; the keys ``layer_<i>``) stored as :class:`~ec2moe_jax.layers.quant.QuantizedWeight`
    (weight-only int8/int4/int2; biases, router and shared expert stay float). The MoE block
    dequantises them where it uses them, so every dispatch path runs unchanged; the values
    equal a model whose float experts were replaced by their dequantised copies.

    Raises:
      ValueError: for ``spec`` bf16 (see :func:`~ec2moe_jax.layers.quant.quantize`), or a
        block in ``layers`` already unstacked or quantised.
    """
    if spec.bits == 16:
        raise ValueError("spec is bf16: keep the float parameters")
    return _map_blocks(params, lambda i, w: quantize(w, spec, search),
                       lambda i: layers is None or i in layers)


def quantize_experts_mixed(params, bits: dict[int, np.ndarray], group_size: int | None = None):
    """``params`` with layer ``i``'s routed experts stored in ``bits[i]`` <int>[E] bits each
    (16, 8, 4, 2, or 0: not stored; :func:`~ec2moe_jax.layers.quant.quantize_mixed`), for
    every layer ``i`` in ``bits``. Experts not stored dequantise to zero: route with an
    ``allowed`` mask that excludes them.

    Raises:
      ValueError: a bad ``bits`` row, or a block already unstacked or quantised.
    """
    return _map_blocks(params, lambda i, w: quantize_mixed(w, bits[i], group_size),
                       lambda i: i in bits)


def _map_blocks(params, quantise, selected):
    """Replaces the expert weights of the selected layers' MoE blocks by
    ``quantise(layer, stacked weight)`` under :data:`QUANTIZED`."""

    def walk(tree, layer: int | None):
        if not isinstance(tree, dict):
            return tree
        if layer is not None and (UNSTACKED in tree or QUANTIZED in tree):
            held = ("per-expert buffers (unstack_experts)" if UNSTACKED in tree
                    else "quantised experts already")
            raise ValueError(f"quantising needs the stacked float experts; the MoE block of "
                             f"layer {layer} holds {held}: quantise the checkpoint's parameters "
                             "before unstacking or placing them")
        if _is_moe_block(tree) and layer is not None:
            out = {k: v for k, v in tree.items() if k not in _WEIGHTS}
            out[QUANTIZED] = {k: quantise(layer, tree[k]) for k in _WEIGHTS}
            return out
        return {k: walk(v, layer if layer is not None else _selected_layer(k, selected))
                for k, v in tree.items()}

    return walk(unbox(params), None)


def _selected_layer(key: str, selected) -> int | None:
    if not key.startswith("layer_"):
        return None
    i = int(key.split("_", 1)[1])
    return i if selected(i) else None


def unstack_experts(params):
    """``params`` with every MoE layer's stacked expert arrays [E, ...] split into a tuple of
    E arrays (one device buffer per expert), for decoding without sharded experts.

    XLA:CPU copies a slice of a stacked weight before multiplying by it, so the decode-shaped
    path, which reads K of E experts per token, spent most of a step copying the chosen
    experts (measured: 12 copies of 0.5 MB, 3 of a 6.4 ms step of a d=512 16-expert model).
    With one buffer per expert, a ``lax.switch`` multiplies by the chosen expert's own
    buffer. Every dispatch accepts either form (the capacity-slot dispatches then run one
    matmul per expert); ``ragged`` needs the stacked form. Not for a mesh whose 'expert' axis
    shards the experts (each expert then lives on one shard): call it on replicated or
    single-device parameters. The split costs one copy of the experts (their memory while
    the stacked arrays are still referenced).
    """
    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        if _is_moe_block(tree):  # a MoEBlock's parameters (quantised ones stay as they are)
            out = {k: v for k, v in tree.items() if k not in EXPERT_PARAMS}
            out[UNSTACKED] = {k: tuple(v[i] for i in range(v.shape[0]))
                              for k, v in tree.items() if k in EXPERT_PARAMS}
            return out
        return {k: walk(v) for k, v in tree.items()}

    return walk(unbox(params))
