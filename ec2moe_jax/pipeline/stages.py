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
transport, temperature) are closed over; values (tokens, masks, gate and codec weights,
per-row valid lengths) are arguments.

One process may hold one side only: ``build_stages(..., side="end")`` in a client,
``side="cloud"`` in a server, which places the cloud's parameters once
(:func:`place_params`, every layer) and builds the cloud side of any split from them without
copying.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ec2moe_jax.codec import FP32, CodecSpec, lowrank, wire
from ec2moe_jax.config import ModelConfig
from ec2moe_jax.layers.group_gate import make_gates
from ec2moe_jax.layers.moe import quantize_experts, unstack_experts
from ec2moe_jax.layers.quant import QuantSpec
from ec2moe_jax.models.generate import decode_jit, last_valid, sample_token
from ec2moe_jax.models.lm import MoELM, cache_positions, cache_shapes, set_cache_positions
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


SIDES = ("both", "end", "cloud")


@dataclasses.dataclass
class Stages:
    """Jitted end and cloud stages of one split, with their parameters already placed.

    Build with :func:`build_stages`. Every function returns device arrays without blocking.
    ``end_*`` take end-resident arguments, ``cloud_*`` cloud-resident ones. Run them through
    :mod:`~.engine` (:class:`~.engine.EndEngine`, :class:`~.engine.CloudEngine`), which
    places inputs, hops messages across (:func:`~ec2moe_jax.sharding.hop`) and counts bytes.

    A one-sided build (``side="end"``: a client process; ``side="cloud"``: a server process)
    holds only that side's mesh, parameters and functions; the other side's are None.

    Decode stage functions: ``prefill_end``/``step_end(params, extra, cache, tokens [B, T],
    lengths [B], rng)`` and ``prefill_cloud``/``step_cloud(params, codec, cache, msg,
    lengths [B], rng)`` return ``(cache, out)``; ``lengths`` counts each row's valid
    positions (right padding after them; 0: the row idles), and each row's cache advances
    by its length. ``step_*`` donate the cache.
    """

    model: MoELM
    split: int
    transport: CodecSpec
    end_mesh: Mesh | None
    cloud_mesh: Mesh | None
    end_params: dict | None
    cloud_params: dict | None
    end_extra: dict | None  # {"allowed", "gates", "codec"}: traced end arguments
    cloud_codec: dict | None
    score_end: Callable | None
    score_cloud: Callable | None
    prefill_end: Callable | None
    step_end: Callable | None
    prefill_cloud: Callable | None
    step_cloud: Callable | None
    side: str = "both"

    @property
    def num_layers(self) -> int:
        return self.model.cfg.num_layers

    @property
    def end_only(self) -> bool:
        return self.split == self.num_layers

    @property
    def cloud_only(self) -> bool:
        return self.split == 0

    def has(self, side: str) -> bool:
        """Whether this build holds ``side`` ("end" or "cloud")."""
        return self.side in ("both", side)

    def init_cache(self, side: str, batch: int, length: int | None = None, dtype=None):
        """Zeroed KV cache for ``batch`` sequences of up to ``length`` positions (default
        ``max_seq_len``; size it to the request with
        :func:`~ec2moe_jax.models.lm.cache_bucket`) of one side: ``"end"`` (layers < s, on the
        end mesh) or ``"cloud"`` (layers >= s, on the cloud mesh); ``{}`` for a side without
        layers. Fresh buffers every call (a decode step donates its cache).

        Raises:
          ValueError: an unknown side, one this build does not hold, or a bad length.
        """
        self._check_side(side)
        layers = (range(self.split) if side == "end"
                  else range(self.split, self.num_layers))
        shapes = cache_shapes(self.model.cfg, batch, length, dtype, layers)
        zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
        return hop(zeros, self.end_mesh if side == "end" else self.cloud_mesh)

    def _check_side(self, side: str) -> None:
        if side not in ("end", "cloud"):
            raise ValueError(f"{side=} must be 'end' or 'cloud'")
        if not self.has(side):
            raise ValueError(f"these stages were built with side={self.side!r} and hold no "
                             f"{side} side; build them with side='both' or side={side!r}")

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


def _run_layers(model, v, x, start, stop, cache, lengths, **kw):
    """Layers ``[start, stop)``; with a cache, decode mode and the updated cache, each row
    advanced by its ``lengths`` (right padding and idle rows do not count)."""
    if cache is None:
        return model.apply(v, x, start, stop, method="layers", **kw)[0], None
    if not cache:  # no layers on this side
        return x, cache
    pos = cache_positions(cache)
    (x, _), state = model.apply(v, x, start, stop, decode=True, method="layers",
                                mutable=["cache"], **kw)
    return x, set_cache_positions(state["cache"], pos + lengths)


def _make_fns(model: MoELM, split: int, transport: CodecSpec, temperature: float,
              gate_spec, end_mesh: Mesh | None, cloud_mesh: Mesh | None):
    """The four stage functions (unjitted) closed over the static choices."""
    L = model.cfg.num_layers
    dtype = jnp.dtype(model.cfg.dtype)

    def end_body(params, extra, tokens, cache, lengths=None):
        v = {"params": params} if cache is None else {"params": params, "cache": cache}
        gates = None if gate_spec is None else make_gates(model, gate_spec, extra["gates"])
        x = model.apply(v, tokens, method="embed")
        return _run_layers(model, v, x, 0, split, cache, lengths, allowed=extra["allowed"],
                           gates=gates)

    def cloud_body(params, codec, msg, cache, lengths=None):
        v = {"params": params} if cache is None else {"params": params, "cache": cache}
        x = (model.apply(v, msg, method="embed") if split == 0
             else _decode(codec, msg, dtype))
        return _run_layers(model, v, x, split, L, cache, lengths)

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

    def sample(params, x, lengths, rng):
        last = model.apply({"params": params}, last_valid(x, lengths)[:, None],
                           method="head")[:, 0]
        return sample_token(last, rng, temperature), last

    def decode_end(params, extra, cache, tokens, lengths, rng):
        with use_mesh(end_mesh):
            x, cache = end_body(params, extra, tokens, cache, lengths)
            if split == L:
                return cache, sample(params, x, lengths, rng)
            return cache, _encode(transport, extra["codec"], x)

    def decode_cloud(params, codec, cache, msg, lengths, rng):
        with use_mesh(cloud_mesh):
            x, cache = cloud_body(params, codec, msg, cache, lengths)
            return cache, sample(params, x, lengths, rng)

    return score_end, score_cloud, decode_end, decode_cloud


@functools.lru_cache(maxsize=8)
def _boxed_shapes(cfg: ModelConfig):
    """Parameter shapes with their logical axes (tracing the model's init is slow: once)."""
    model = MoELM(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
                          )["params"]


def place_params(model: MoELM, params, mesh: Mesh, layers: range | None = None,
                 experts: QuantSpec | None = None) -> dict:
    """The parameters a side needs on ``mesh`` (blocks in ``layers``, default all, and every
    non-layer entry: embedding, final norm, head), sharded by the logical axis rules
    (experts over 'expert'). An array already placed so is not copied: a server places the
    cloud's parameters once (``layers=None``) and builds the cloud side of every split from
    that one tree (:func:`build_stages` with ``side="cloud"``), sharing the buffers.

    ``experts``: int8/int4 stores the routed experts of ``layers`` weight-only quantised
    (:func:`~ec2moe_jax.layers.quantize_experts`, replicated over ``mesh``); None or bf16:
    as they are.
    """
    layers = range(model.cfg.num_layers) if layers is None else layers
    sh = param_shardings(_layer_subset(_boxed_shapes(model.cfg), layers), mesh)
    tree = _layer_subset(unbox(params), layers)
    if experts is not None and experts.bits < 16:
        tree = quantize_experts(tree, experts)
    flat = dict(traverse_util.flatten_dict(tree, sep="/"))
    shard = dict(traverse_util.flatten_dict(sh, sep="/"))
    rep = NamedSharding(mesh, PartitionSpec())
    placed = traverse_util.unflatten_dict(
        {k: jax.device_put(v, shard.get(k, rep)) for k, v in flat.items()}, sep="/")
    if mesh.shape.get("expert", 1) > 1:  # experts sharded: the stacked form
        return placed
    # Experts on every device of the mesh: one buffer per expert (unstack_experts), which
    # decodes without copying the chosen experts; a tree already split is placed as it is.
    return unstack_experts(placed)


def _check_build(model, split, side, end_mesh, cloud_mesh, transport, codec, gates):
    cfg = model.cfg
    if not 0 <= split <= cfg.num_layers:
        raise ValueError(f"{split=} must lie in [0, num_layers={cfg.num_layers}]")
    if side not in SIDES:
        raise ValueError(f"{side=} must be one of {SIDES}")
    for name, mesh, need in (("end_mesh", end_mesh, "cloud"), ("cloud_mesh", cloud_mesh, "end")):
        if mesh is None and side != need:
            raise ValueError(f"side={side!r} needs {name}; pass a Mesh (or build side={need!r})")
    if transport.lowrank:
        key, shape = (("w_enc", (cfg.d_model, transport.rank)) if side != "cloud"
                      else ("w_dec", (transport.rank, cfg.d_model)))
        got = None if codec is None or key not in codec else tuple(np.shape(codec[key]))
        if got != shape:
            raise ValueError(f"transport {transport.name!r} rank {transport.rank} needs codec "
                             f"weights {key} of shape {shape}, got {got}")
    if gates is not None and gates[0].num_end_layers != split:
        raise ValueError(f"the gates were trained for {gates[0].num_end_layers} end layers, "
                         f"the plan runs {split} on the end")


def build_stages(
    model: MoELM,
    params,
    end_mesh: Mesh | None,
    cloud_mesh: Mesh | None,
    *,
    split: int,
    transport: CodecSpec = FP32,
    allowed: jax.Array | None = None,
    gates: tuple | None = None,
    codec: dict | None = None,
    temperature: float = 0.0,
    side: str = "both",
    end_experts: QuantSpec | None = None,
) -> Stages:
    """Places the parameters on the submesh(es) and jits the stages of one split.

    Args:
      params: the LM's parameters (plain arrays, anywhere; for the cloud side, ideally the
        tree :func:`place_params` placed once on ``cloud_mesh``: then nothing is copied).
      end_mesh, cloud_mesh: the two submeshes; the side not built may be None.
      split: layers ``[0, split)`` run on the end.
      transport: what crosses the link (a :class:`~ec2moe_jax.codec.CodecSpec`).
      allowed: <bool>[L, E] resident experts of the end layers (None: all).
      gates: ``(GateSpec, gate_params)`` of the end's group gates, or None (the router).
      codec: ``{"mean", "w_enc", "w_dec"}`` for a low-rank transport (the end needs
        ``mean``/``w_enc``, the cloud ``mean``/``w_dec``).
      temperature: sampling temperature (0 = greedy), closed over.
      side: ``"both"`` (the in-process pipeline), ``"end"`` (embedding, layers
        ``[0, split)`` and the encoder only: a client process) or ``"cloud"`` (decoder,
        layers ``[split, L)`` and the head only: a server process).
      end_experts: how the end stores its experts: None/bf16 as given, int8 or int4
        weight-only quantised (:class:`~ec2moe_jax.layers.QuantSpec`); the cloud is
        unchanged.

    Raises:
      ValueError: a split outside ``[0, L]``, an unknown side or a missing mesh, codec
        weights of the wrong shape, gates trained for another split, or a mask not [L, E].
    """
    cfg = model.cfg
    L, E = cfg.num_layers, cfg.moe.num_experts
    _check_build(model, split, side, end_mesh, cloud_mesh, transport, codec, gates)
    allowed = jnp.ones((L, E), bool) if allowed is None else jnp.asarray(allowed, bool)
    if allowed.shape != (L, E):
        raise ValueError(f"allowed mask has shape {allowed.shape}, expected {(L, E)}")
    score_end, score_cloud, dec_end, dec_cloud = _make_fns(
        model, split, transport, temperature, None if gates is None else gates[0],
        end_mesh, cloud_mesh)
    end = cloud = {}
    if side != "cloud":
        codec_enc = None if codec is None else {k: codec[k] for k in ("mean", "w_enc")}
        extra = {"allowed": allowed, "codec": codec_enc,
                 "gates": None if gates is None else gates[1]}
        end = {"end_params": place_params(model, params, end_mesh, range(split), end_experts),
               "end_extra": jax.device_put(extra, NamedSharding(end_mesh, PartitionSpec())),
               "score_end": jax.jit(score_end), "prefill_end": decode_jit(dec_end),
               "step_end": decode_jit(dec_end, donate_argnums=2)}
    if side != "end":
        cloud_codec = None if codec is None else jax.device_put(
            {k: codec[k] for k in ("mean", "w_dec")}, NamedSharding(cloud_mesh, PartitionSpec()))
        cloud = {"cloud_params": place_params(model, params, cloud_mesh, range(split, L)),
                 "cloud_codec": cloud_codec, "score_cloud": jax.jit(score_cloud),
                 "prefill_cloud": decode_jit(dec_cloud),
                 "step_cloud": decode_jit(dec_cloud, donate_argnums=2)}
    none = dict.fromkeys(("end_params", "end_extra", "score_end", "prefill_end", "step_end",
                          "cloud_params", "cloud_codec", "score_cloud", "prefill_cloud",
                          "step_cloud"))
    return Stages(model=model, split=split, transport=transport, side=side,
                  end_mesh=end_mesh if side != "cloud" else None,
                  cloud_mesh=cloud_mesh if side != "end" else None,
                  **{**none, **end, **cloud})
