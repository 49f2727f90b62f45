"""The MoE language model and generation."""

from ec2moe_jax.layers.moe import unstack_experts
from ec2moe_jax.models.generate import (
    Decoder,
    generate,
    generate_recompute,
    make_decoder,
    sample_token,
)
from ec2moe_jax.models.hf import UnsupportedCheckpoint, load_hf, reference_parity
from ec2moe_jax.models.lm import (
    MoELM,
    cache_bucket,
    cache_length,
    cache_positions,
    cache_shapes,
    cast_params,
    init_cache,
    init_params,
    routing_stats,
    set_cache_positions,
    summarize_routes,
)

__all__ = [
    "MoELM",
    "UnsupportedCheckpoint",
    "generate",
    "generate_recompute",
    "Decoder",
    "cache_bucket",
    "cache_length",
    "cache_positions",
    "cache_shapes",
    "cast_params",
    "set_cache_positions",
    "init_cache",
    "init_params",
    "load_hf",
    "reference_parity",
    "make_decoder",
    "routing_stats",
    "sample_token",
    "summarize_routes",
    "unstack_experts",
]
