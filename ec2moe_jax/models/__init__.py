"""The MoE language model and generation."""

from ec2moe_jax.models.generate import generate, generate_recompute, make_decoder, sample_token
from ec2moe_jax.models.lm import MoELM, init_cache, init_params, summarize_routes

__all__ = [
    "MoELM",
    "generate",
    "generate_recompute",
    "init_cache",
    "init_params",
    "make_decoder",
    "sample_token",
    "summarize_routes",
]
