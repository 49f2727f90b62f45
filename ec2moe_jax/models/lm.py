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

from ec2moe_jax.config import ModelConfig
from ec2moe_jax.layers.basic import RMSNorm, default_init, dense, param_with_axes
from ec2moe_jax.layers.block import DecoderBlock
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
        self.blocks = [DecoderBlock(cfg, moe=cfg.is_moe_layer(i), name=f"layer_{i}")
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
        return jnp.take(self.embedding, tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))

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
        return dense(x, w.astype(jnp.float32))

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


def init_cache(model: MoELM, params, batch_size: int):
    """A zeroed KV cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens."""
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda: model.apply({"params": params}, tokens, decode=True, mutable=["cache"])[1]
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
