"""Benchmark: decision time of the heuristic (measured on this CPU).

One jitted :func:`~ec2moe_jax.scheduler.heuristic.schedule` call per repeat on a 32-layer,
64-expert model with 16 end devices, after compilation; the median over repeats is the
figure (the CPU is shared, so medians, not means). New bandwidth values each repeat, so the
timing includes no caching of results, and a trace counter checks nothing recompiles.
"""

from __future__ import annotations

import dataclasses
import platform
import time

import jax
import numpy as np

from ec2moe_jax.config import load_config
from ec2moe_jax.models.costs import model_costs
from ec2moe_jax.profiles import LinkProfile, device
from ec2moe_jax.scheduler import build_instance, schedule, zipf_frequencies


def run(layers: int = 32, experts: int = 64, devices: int = 16, repeats: int = 30,
        gen_tokens: int = 0, seed: int = 0) -> dict:
    base = load_config("base").model
    cfg = dataclasses.replace(base, num_layers=layers, moe_layers=None,
                              moe=dataclasses.replace(base.moe, num_experts=experts))
    costs = model_costs(cfg)
    freq = zipf_frequencies(layers, experts, 1.0, seed)
    rng = np.random.default_rng(seed)
    ends = [device(rng.choice(["jetson-orin-nano-8gb", "raspberry-pi-5-8gb", "laptop-cpu"]))
            .with_memory(float(rng.uniform(0.5, 4)) * 2**30) for _ in range(devices)]
    links = [LinkProfile("l", float(10 ** rng.uniform(6, 8)), 0.03) for _ in range(devices)]
    inst = build_instance(costs, freq, ends, device("a100-40gb"), links, [1.0] * devices,
                          gen_tokens=gen_tokens)
    jax.block_until_ready(schedule(inst))
    times = []
    for r in range(repeats):
        scen = inst.replace(link_bps=inst.link_bps * (1 + 0.01 * r))
        jax.block_until_ready(scen)
        t = time.perf_counter()
        jax.block_until_ready(schedule(scen))
        times.append(time.perf_counter() - t)
    cands = (layers + 1) * 3 * inst.codec_bytes.shape[0] * inst.batch.shape[0]
    return {
        "benchmark": "scheduler_decision_time",
        "method": f"measured on this CPU ({platform.machine()}, shared with another job), "
                  f"jax {jax.__version__}, jitted, after compilation",
        "instance": {"layers": layers, "experts": experts, "end_devices": devices,
                     "candidates_per_device": cands, "best_response_rounds": 3,
                     "workload": "decoding" if gen_tokens else "single-pass"},
        "repeats": repeats,
        "median_ms": 1e3 * float(np.median(times)),
        "p90_ms": 1e3 * float(np.quantile(times, 0.9)),
        "min_ms": 1e3 * float(np.min(times)),
        "target_ms": 10.0,
        "recompiles_after_first": int(schedule._cache_size()) - 1,
    }
