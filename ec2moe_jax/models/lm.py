"""The decoder-only MoE language model.

Shape legend: B batch, T time, D model, V vocab, L layers, E experts.

Besides ``__call__`` the model exposes its three stages as methods so the end/cloud
pipeline can run a layer range on one submesh (``model.apply(v, x, 0, 2, method="layers")``):
``embed`` (tokens -> hidden), ``layers`` (hidden -> hidden over ``[start, stop)``) and
``head`` (hidden -> logits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.config import ModelConfig
from ec2moe_jax.layers.basic import RMSNorm, default_init, dense, param_with_axes
from ec2moe_jax.layers.block import DecoderBlock
from ec2moe_jax.layers.quant import QuantizedExperts, QuantizedWeight
from ec2moe_jax.routing.stats import stats_from_routes
from ec2moe_jax.routing.topk import Route


def summarize_routes(routes: list[Route]) -> dict[str, jax.Array]:
    """Sums the routing losses and stacks per-layer expert statistics of MoE layers."""
    if not routes:
        zero = jnp.zeros((), jnp.float32)
        return {"aux_loss": zero, "z_loss": zero}
    return {
        "aux_loss": sum(r.aux_loss for r in routes),
        "z_loss": sum(r.z_loss for r in routes),
        "expert_counts": jnp.stack([r.expert_counts.sum(0) for r in routes]),  # [L_moe, E]
        "expert_load": jnp.stack([r.expert_load.sum(0) for r in routes]),
        "dropped_fraction": jnp.mean(jnp.stack([r.dropped_fraction for r in routes])),
    }


class MoELM(nn.Module):
    """Token embedding, ``num_layers`` decoder blocks, final RMSNorm and the LM head."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embedding = self.param(
            "embedding", param_with_axes(nn.initializers.normal(1.0), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model))
        self.blocks = [DecoderBlock(cfg, moe=cfg.is_moe_layer(i), window=cfg.window(i),
                                    name=f"layer_{i}")
                       for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = self.param(
                "lm_head", param_with_axes(default_init, ("embed", "vocab")),
                (cfg.d_model, cfg.vocab_size))

    def embed(self, tokens: jax.Array) -> jax.Array:
        """<int32>[B, T] -> [B, T, D]."""
        if tokens.ndim != 2:
            raise ValueError(f"token ids must be [batch, time], got shape {tokens.shape}")
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds "
                             f"max_seq_len={self.cfg.max_seq_len}")
        x = jnp.take(self.embedding, tokens, axis=0)
        if self.cfg.embedding_multiplier != 1.0:  # GraniteMoE
            x = x * self.cfg.embedding_multiplier
        return x.astype(jnp.dtype(self.cfg.dtype))

    def layers(
        self,
        x: jax.Array,
        start: int = 0,
        stop: int | None = None,
        *,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        allowed: jax.Array | None = None,
        gates: Mapping[int, Callable[[jax.Array, jax.Array], jax.Array]] | None = None,
    ) -> tuple[jax.Array, list[Route]]:
        """Runs blocks ``[start, stop)``; ``allowed``: <bool>[L, E] per-layer expert masks;
        ``gates``: layer index -> a gate replacing that layer's router (see MoEBlock)."""
        stop = self.cfg.num_layers if stop is None else stop
        if not 0 <= start <= stop <= self.cfg.num_layers:
            raise ValueError(f"layer range [{start}, {stop}) outside [0, {self.cfg.num_layers}]")
        if positions is None:
            b, t = x.shape[:2]
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        routes = []
        for i in range(start, stop):
            mask = None if allowed is None else allowed[i]
            gate = None if gates is None else gates.get(i)
            x, route = self.blocks[i](x, positions, deterministic=deterministic, decode=decode,
                                      allowed=mask, gate=gate)
            if route is not None:
                routes.append(route)
        return x, routes

    def head(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> float32 logits [B, T, V]."""
        x = self.final_norm(x).astype(jnp.float32)
        w = self.embedding.T if self.cfg.tie_embeddings else self.lm_head
        logits = dense(x, w.astype(jnp.float32))
        if self.cfg.logits_scaling != 1.0:  # GraniteMoE divides its logits
            logits = logits / self.cfg.logits_scaling
        return logits

    def __call__(
        self,
        tokens: jax.Array,
        *,
        deterministic: bool = True,
        decode: bool = False,
        allowed: jax.Array | None = None,
        return_aux: bool = False,
    ):
        """<int32>[B, T] -> logits [B, T, V] (and a dict of routing losses/statistics)."""
        x = self.embed(tokens)
        x, routes = self.layers(x, deterministic=deterministic, decode=decode, allowed=allowed)
        logits = self.head(x)
        if return_aux:
            return logits, summarize_routes(routes)
        return logits


def routing_stats(model: MoELM, params, tokens: jax.Array, allowed: jax.Array | None = None):
    """:class:`~ec2moe_jax.routing.RoutingStats` of one forward pass over ``tokens`` [B, T]
    (jit-able; sum the results of several batches with ``+``)."""
    v = {"params": params}
    x = model.apply(v, tokens, method="embed")
    _, routes = model.apply(v, x, allowed=allowed, method="layers")
    return stats_from_routes(routes)


def init_params(model: MoELM, rng: jax.Array, batch_size: int = 1, seq_len: int = 8):
    """Initialises the (logically boxed) parameters."""
    tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
    return model.init(rng, tokens)["params"]


def cache_bucket(length: int, max_seq_len: int, smallest: int = 64) -> int:
    """The cache (or padded prompt) length for ``length`` positions: the next power of two,
    at least ``smallest``, at most ``max_seq_len``. A handful of sizes, so requests of similar
    lengths share one compiled program.

    Raises:
      ValueError: ``length`` is < 1 or exceeds ``max_seq_len``.
    """
    if not 1 <= length <= max_seq_len:
        raise ValueError(f"{length=} positions must lie in [1, max_seq_len={max_seq_len}]; "
                         "shorten the prompt or max_new_tokens")
    return min(max_seq_len, max(smallest, 1 << (length - 1).bit_length()))


def cache_shapes(cfg: ModelConfig, batch_size: int, length: int | None = None,
                 dtype=None, layers: range | None = None) -> dict:
    """Shapes of the KV cache of ``layers`` (default all): per layer ``{"attn":
    {"cached_key", "cached_value": [B, Hk, M, Dh], "cache_index": <int32>[B]}}`` with
    M = ``length`` (default ``max_seq_len``) in ``dtype`` (default the activation dtype).
    Built from the config, without tracing the model."""
    m = cfg.max_seq_len if length is None else length
    if not 1 <= m <= cfg.max_seq_len:
        raise ValueError(f"cache length {m} must lie in [1, max_seq_len={cfg.max_seq_len}]")
    dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
    kv = jax.ShapeDtypeStruct((batch_size, cfg.kv_heads, m, cfg.dim_per_head), dtype)
    one = {"cache_index": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
           "cached_key": kv, "cached_value": kv}
    layers = range(cfg.num_layers) if layers is None else layers
    return {f"layer_{i}": {"attn": dict(one)} for i in layers}


def init_cache(model: MoELM, batch_size: int, length: int | None = None, dtype=None):
    """A zeroed KV cache (every row at position 0) for ``batch_size`` sequences of up to
    ``length`` positions (default ``max_seq_len``; :func:`cache_bucket` sizes one to a
    request), keys/values in ``dtype`` (default the model's activation dtype; bfloat16
    halves the cache). See :func:`cache_shapes`."""
    shapes = cache_shapes(model.cfg, batch_size, length, dtype)
    # Host zeros placed in one transfer: a jnp.zeros per leaf cost one dispatch each, per
    # request (three per layer).
    return jax.device_put(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))


def cache_length(cache) -> int | None:
    """M, the positions each row of ``cache`` can hold (None for a cache without layers)."""
    keys = [layer["attn"]["cached_key"] for layer in cache.values()]
    return int(keys[0].shape[2]) if keys else None


def cache_positions(cache) -> jax.Array | None:
    """<int32>[B] the next write position of each row (None for a cache without layers)."""
    idx = [layer["attn"]["cache_index"] for layer in cache.values()]
    return idx[0] if idx else None


def set_cache_positions(cache, positions: jax.Array):
    """``cache`` with every layer's write position set to ``positions`` <int32>[B]: after a
    right-padded prefill (a row's true length) or a step where some rows were idle (they keep
    their position; what the step wrote past it is masked and overwritten later)."""
    return {name: {"attn": {**layer["attn"], "cache_index": positions.astype(jnp.int32)}}
            for name, layer in cache.items()}


def cast_params(params, dtype="bfloat16"):
    """The parameters with every weight matrix (ndim >= 2) stored in ``dtype``: half the
    bytes a decode step streams from memory in bfloat16. Routers stay float32 (router maths
    runs in float32, and a rounded router can choose other experts), as do vectors (norm
    scales, biases). Use with a model whose config ``dtype`` matches."""
    dtype = jnp.dtype(dtype)

    def one(path, x):
        if isinstance(x, QuantizedWeight | QuantizedExperts):  # stored as the end stores them
            return x
        if x.ndim < 2 or any(getattr(k, "key", None) == "router" for k in path):
            return x
        return x.astype(dtype)

    return jax.tree_util.tree_map_with_path(
        one, params, is_leaf=lambda x: isinstance(x, QuantizedWeight | QuantizedExperts))
