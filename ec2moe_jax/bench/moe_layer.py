"""Benchmark: the MoE layer forward against a dense SwiGLU of equal FLOPs, side by side.

Method (measured): one jitted forward per implementation, compiled and warmed up first, then
``rounds`` rounds that time each implementation ``iters`` times in turn (interleaved, so
drifts in machine load hit all of them alike); figures are medians over all timings.
FLOPs count only the routed expert matmuls, ``T * K * 3 * 2 * D * F`` (SwiGLU has three
matmuls), which the dense baseline matches with hidden width ``K * F`` on the same T tokens.
With ``capacity_factor = 1`` the expert buffers hold exactly ``T * K`` slots, so the MoE
layer computes exactly the routed FLOPs (a token over capacity is dropped, and counted).
"""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.config import MoEConfig
from ec2moe_jax.layers import MoEBlock, SwiGLU


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def run(
    tokens: int = 4096,
    d_model: int = 512,
    expert_dim: int = 1024,
    num_experts: int = 8,
    top_k: int = 2,
    dispatches: tuple[str, ...] = ("gather", "einsum", "ragged"),
    rounds: int = 5,
    iters: int = 3,
    seed: int = 0,
) -> dict:
    """Times each dispatch and the dense baseline; returns the JSON-ready record."""
    x = jax.random.normal(jax.random.key(seed), (1, tokens, d_model), jnp.float32)
    fns = {}
    dropped = {}
    for dispatch in dispatches:
        cfg = MoEConfig(num_experts=num_experts, top_k=top_k, expert_dim=expert_dim,
                        capacity_factor=1.0, eval_capacity_factor=1.0, dispatch=dispatch)
        block = MoEBlock(cfg)
        params = block.init(jax.random.key(seed + 1), x[:, :8])
        fwd = jax.jit(lambda p, x, block=block: block.apply(p, x, deterministic=True))
        _, route = fwd(params, x)
        dropped[dispatch] = float(route.dropped_fraction)
        fns[dispatch] = (lambda p, x, f=fwd: f(p, x)[0], params)
    dense = SwiGLU(top_k * expert_dim)
    dense_params = dense.init(jax.random.key(seed + 2), x[:, :8])
    fns["dense"] = (jax.jit(dense.apply), dense_params)

    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn, params in fns.values():  # compile and warm up
        _timed(fn, params, x)
        _timed(fn, params, x)
    for _ in range(rounds):
        for name, (fn, params) in fns.items():
            times[name].extend(_timed(fn, params, x) for _ in range(iters))

    flops = tokens * top_k * 3 * 2 * d_model * expert_dim

    def figures(name: str) -> dict:
        median = float(np.median(times[name]))
        return {"median_seconds": median, "tokens_per_s": tokens / median,
                "gflops_per_s": flops / median / 1e9, "timings": len(times[name])}

    record = {
        "benchmark": "moe_layer_forward",
        "method": "measured",
        "device": f"{jax.devices()[0].platform}: {platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores, jax {jax.__version__}",
        "shape": {"T": tokens, "D": d_model, "F": expert_dim, "E": num_experts, "K": top_k,
                  "dtype": "float32", "capacity_factor": 1.0},
        "routed_gflop": flops / 1e9,
        "dense": {"hidden": top_k * expert_dim, **figures("dense")},
        "moe": {d: {**figures(d), "dropped_fraction": dropped[d]} for d in dispatches},
        "rounds": rounds,
        "iters_per_round": iters,
    }
    best = dispatches[0]
    record["fast_path"] = best
    record["ratio_to_dense"] = record["moe"][best]["gflops_per_s"] / record["dense"][
        "gflops_per_s"]
    return record
