"""Stage functions of the end-cloud pipeline, each jitted once on its own submesh.

Shape legend: B batch (one micro-batch), T time (prompt or scored tokens), D model,
V vocab, L layers, E experts, R codec rank.

The end runs the embedding and layers ``[0, s)`` with only its resident experts (the
``allowed`` mask, a traced argument, so a new mask never recompiles) and optionally the
HL-GGN group gates, then encodes the boundary hidden state for the link. The cloud decodes
it and runs layers ``[s, L)`` with every expert (stacked weights sharded over the cloud
mesh's 'expert' axis) and the LM head. ``s = 0`` is cloud-only (token ids go up), ``s = L``
end-only (the end samples, nothing crosses the link). The hop between the two meshes is an
explicit :func:`~ec2moe_jax.sharding.hop` (one jit cannot span two meshes), made by the
stage engine (:mod:`~.engine`), which runs these stages. Hyperparameters (split,
transport, temperature) are closed over; values (tokens, masks, gate and codec weights) are
arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ec2moe_jax.codec import FP32, CodecSpec, lowrank, wire
from ec2moe_jax.layers.group_gate import make_gates
from ec2moe_jax.models.generate import sample_token
from ec2moe_jax.models.lm import MoELM, init_cache
from ec2moe_jax.sharding import hop, param_shardings, unbox, use_mesh

TOKEN_BYTES = wire.TOKEN_BYTES
def token_message_bytes(batch: int, time: int) -> int:
    """Wire bytes of [batch, time] token ids or float32 scores (header + 4 bytes each)."""
    return wire.HEADER_BYTES + TOKEN_BYTES * batch * time


def _encode(transport: CodecSpec, codec, h):
    if not transport.lowrank:
        return {"h": h.astype(jnp.bfloat16 if transport.kind == "bf16" else jnp.float32)}
    z = lowrank.encode(codec, h)
    if transport.quant_bits is None:
        return {"z": z}
    q, scale = lowrank.quantize(z, transport.quant_bits)
    return {"q": q, "scale": scale}


def _decode(codec, msg, dtype):
    if "h" in msg:
        return msg["h"].astype(dtype)
    z = msg["z"] if "z" in msg else lowrank.dequantize(msg["q"], msg["scale"])
    return lowrank.decode(codec, z).astype(dtype)


def _layer_subset(tree, layers: range):
    """The top-level entries a stage needs: every non-layer entry (embedding, final norm,
    head: the model's ``setup`` binds them all) and the blocks in ``layers``."""
    keep = {f"layer_{i}" for i in layers}
    return {k: v for k, v in tree.items() if not k.startswith("layer_") or k in keep}


@dataclasses.dataclass
class Stages:
    """Jitted end and cloud stages of one split, with their parameters already placed.

    Build with :func:`build_stages`. Every function returns device arrays without blocking.
    ``end_*`` take end-resident arguments, ``cloud_*`` cloud-resident ones. Run them through
    :mod:`~.engine` (:class:`~.engine.EndEngine`, :class:`~.engine.CloudEngine`), which
    places inputs, hops messages across (:func:`~ec2moe_jax.sharding.hop`) and counts bytes.
    """

    model: MoELM
    split: int
    transport: CodecSpec
    end_mesh: Mesh
    cloud_mesh: Mesh
    end_params: dict
    cloud_params: dict
    end_extra: dict  # {"allowed", "gates", "codec"}: traced end arguments
    cloud_codec: dict | None
    score_end: Callable
    score_cloud: Callable
    prefill_end: Callable
    step_end: Callable
    prefill_cloud: Callable
    step_cloud: Callable
    full_params: dict = dataclasses.field(repr=False, default=None)  # cache shapes only
    _cache_shapes: dict = dataclasses.field(repr=False, default_factory=dict)  # B -> shapes

    @property
    def num_layers(self) -> int:
        return self.model.cfg.num_layers

    @property
    def end_only(self) -> bool:
        return self.split == self.num_layers

    @property
    def cloud_only(self) -> bool:
        return self.split == 0

    def init_cache(self, side: str, batch: int):
        """Zeroed KV cache for ``batch`` sequences of one side: ``"end"`` (layers < s, on the
        end mesh) or ``"cloud"`` (layers >= s, on the cloud mesh); ``{}`` for a side
        without layers. Fresh buffers every call (a decode step donates its cache)."""
        if side not in ("end", "cloud"):
            raise ValueError(f"{side=} must be 'end' or 'cloud'")
        if batch not in self._cache_shapes:  # tracing the model for shapes is slow
            self._cache_shapes[batch] = jax.eval_shape(
                lambda: init_cache(self.model, self.full_params, batch))
        layers = (range(self.split) if side == "end"
                  else range(self.split, self.num_layers))
        shapes = _layer_subset(self._cache_shapes[batch], layers)
        zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
        return hop(zeros, self.end_mesh if side == "end" else self.cloud_mesh)

    def up_bytes(self, batch: int, time: int) -> int:
        """Wire bytes of one end-to-cloud message of [batch, time] positions."""
        if self.cloud_only:
            return token_message_bytes(batch, time)
        return self.transport.payload_bytes(batch, time, self.model.cfg.d_model)


def _score_tail(model, v, x, targets):
    """Logits [B, T, V] and log-probabilities [B, T] of ``targets`` from a hidden state."""
    logits = model.apply(v, x, method="head")
    logp = jax.nn.log_softmax(logits, -1)
    return logits, jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]


def _run_layers(model, v, x, start, stop, cache, **kw):
    """Layers ``[start, stop)``; with a cache, decode mode and the updated cache."""
    if cache is None:
        return model.apply(v, x, start, stop, method="layers", **kw)[0], None
    (x, _), state = model.apply(v, x, start, stop, decode=True, method="layers",
                                mutable=["cache"], **kw)
    return x, state["cache"]


def _make_fns(model: MoELM, split: int, transport: CodecSpec, temperature: float,
              gate_spec, end_mesh: Mesh, cloud_mesh: Mesh):
    """The six stage functions (unjitted) closed over the static choices."""
    L = model.cfg.num_layers
    dtype = jnp.dtype(model.cfg.dtype)

    def end_body(params, extra, tokens, cache):
        v = {"params": params} if cache is None else {"params": params, "cache": cache}
        gates = None if gate_spec is None else make_gates(model, gate_spec, extra["gates"])
        x = model.apply(v, tokens, method="embed")
        return _run_layers(model, v, x, 0, split, cache, allowed=extra["allowed"], gates=gates)

    def cloud_body(params, codec, msg, cache):
        v = {"params": params} if cache is None else {"params": params, "cache": cache}
        x = (model.apply(v, msg, method="embed") if split == 0
             else _decode(codec, msg, dtype))
        return _run_layers(model, v, x, split, L, cache)

    def score_end(params, extra, tokens, targets):
        with use_mesh(end_mesh):
            x, _ = end_body(params, extra, tokens, None)
            if split == L:
                return _score_tail(model, {"params": params}, x, targets)
            return _encode(transport, extra["codec"], x)

    def score_cloud(params, codec, msg, targets):
        with use_mesh(cloud_mesh):
            x, _ = cloud_body(params, codec, msg, None)
            return _score_tail(model, {"params": params}, x, targets)

    def sample(params, x, rng):
        last = model.apply({"params": params}, x[:, -1:], method="head")[:, 0]
        return sample_token(last, rng, temperature), last

    def decode_end(params, extra, cache, tokens, rng):
        with use_mesh(end_mesh):
            x, cache = end_body(params, extra, tokens, cache)
            if split == L:
                return cache, sample(params, x, rng)
            return cache, _encode(transport, extra["codec"], x)

    def decode_cloud(params, codec, cache, msg, rng):
        with use_mesh(cloud_mesh):
            x, cache = cloud_body(params, codec, msg, cache)
            return cache, sample(params, x, rng)

    return score_end, score_cloud, decode_end, decode_cloud


def build_stages(
    model: MoELM,
    params,
    end_mesh: Mesh,
    cloud_mesh: Mesh,
    *,
    split: int,
    transport: CodecSpec = FP32,
    allowed: jax.Array | None = None,
    gates: tuple | None = None,
    codec: dict | None = None,
    temperature: float = 0.0,
) -> Stages:
    """Places the parameters on both submeshes and jits the stages of one split.

    Args:
      params: the LM's parameters (plain arrays, anywhere).
      split: layers ``[0, split)`` run on the end.
      transport: what crosses the link (a :class:`~ec2moe_jax.codec.CodecSpec`).
      allowed: <bool>[L, E] resident experts of the end layers (None: all).
      gates: ``(GateSpec, gate_params)`` of the end's group gates, or None (the router).
      codec: ``{"mean", "w_enc", "w_dec"}`` for a low-rank transport.
      temperature: sampling temperature (0 = greedy), closed over.
    """
    cfg = model.cfg
    L, E = cfg.num_layers, cfg.moe.num_experts
    if not 0 <= split <= L:
        raise ValueError(f"{split=} must lie in [0, num_layers={L}]")
    if transport.lowrank and (codec is None or codec["w_enc"].shape != (cfg.d_model,
                                                                         transport.rank)):
        got = None if codec is None else tuple(codec["w_enc"].shape)
        raise ValueError(f"transport {transport.name!r} rank {transport.rank} needs codec "
                         f"weights w_enc of shape {(cfg.d_model, transport.rank)}, got {got}")
    if gates is not None and gates[0].num_end_layers != split:
        raise ValueError(f"the gates were trained for {gates[0].num_end_layers} end layers, "
                         f"the plan runs {split} on the end")
    allowed = jnp.ones((L, E), bool) if allowed is None else jnp.asarray(allowed, bool)
    if allowed.shape != (L, E):
        raise ValueError(f"allowed mask has shape {allowed.shape}, expected {(L, E)}")
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
                           )["params"]
    params = unbox(params)

    def put(layers, mesh):
        sh = param_shardings(_layer_subset(boxed, layers), mesh)
        return jax.device_put(_layer_subset(params, layers), sh)

    end_params = put(range(split), end_mesh)
    cloud_params = put(range(split, L), cloud_mesh)
    rep_end = NamedSharding(end_mesh, PartitionSpec())
    codec_enc = None if codec is None else {k: codec[k] for k in ("mean", "w_enc")}
    end_extra = jax.device_put({"allowed": allowed, "codec": codec_enc,
                                "gates": None if gates is None else gates[1]}, rep_end)
    cloud_codec = None if codec is None else jax.device_put(
        {k: codec[k] for k in ("mean", "w_dec")}, NamedSharding(cloud_mesh, PartitionSpec()))
    score_end, score_cloud, dec_end, dec_cloud = _make_fns(
        model, split, transport, temperature, None if gates is None else gates[0],
        end_mesh, cloud_mesh)
    stages = Stages(
        model=model, split=split, transport=transport, end_mesh=end_mesh,
        cloud_mesh=cloud_mesh, end_params=end_params, cloud_params=cloud_params,
        end_extra=end_extra, cloud_codec=cloud_codec,
        score_end=jax.jit(score_end), score_cloud=jax.jit(score_cloud),
        prefill_end=jax.jit(dec_end), step_end=jax.jit(dec_end, donate_argnums=2),
        prefill_cloud=jax.jit(dec_cloud), step_cloud=jax.jit(dec_cloud, donate_argnums=2),
        full_params=params)
    return stages
