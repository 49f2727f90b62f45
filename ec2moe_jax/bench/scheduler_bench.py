"""Benchmark: decision time of the heuristic (measured on this CPU).

One jitted :func:`~ec2moe_jax.scheduler.heuristic.schedule` call per repeat on a 32-layer,
64-expert model with 16 end devices, after compilation, for both workloads; the median over
repeats is the figure (the CPU is shared, so medians, not means; the load average is
recorded). New bandwidth values each repeat, so the timing includes no caching of results,
and the jit cache size checks nothing recompiles (one compilation per workload's values is
not needed: workloads differ only in values, so the two share one).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time

import jax
import numpy as np

from ec2moe_jax.config import load_config
from ec2moe_jax.models.costs import model_costs
from ec2moe_jax.profiles import LinkProfile, device
from ec2moe_jax.scheduler import build_instance, codec_options, schedule, zipf_frequencies


def _cpu_model() -> str:
    fallback = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
    except OSError:  # not Linux: the platform's own name is the best we know
        return fallback
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return fallback


def _time(inst, repeats: int) -> list[float]:
    jax.block_until_ready(schedule(inst))
    times = []
    for r in range(repeats):
        scen = inst.replace(link_bps=inst.link_bps * (1 + 0.01 * r))
        jax.block_until_ready(scen)
        t = time.perf_counter()
        jax.block_until_ready(schedule(scen))
        times.append(time.perf_counter() - t)
    return times


def _instance(layers: int, experts: int, devices: int, gen_tokens: int, seed: int,
              codec_sweep):
    base = load_config("base").model
    cfg = dataclasses.replace(base, num_layers=layers, moe_layers=None,
                              moe=dataclasses.replace(base.moe, num_experts=experts))
    costs = model_costs(cfg)
    freq = zipf_frequencies(layers, experts, 1.0, seed)
    rng = np.random.default_rng(seed)
    ends = [device(rng.choice(["jetson-orin-nano-8gb", "raspberry-pi-5-8gb", "laptop-cpu"]))
            .with_memory(float(rng.uniform(0.5, 4)) * 2**30) for _ in range(devices)]
    links = [LinkProfile("l", float(10 ** rng.uniform(6, 8)), 0.03) for _ in range(devices)]
    return build_instance(costs, freq, ends, device("a100-40gb"), links, [1.0] * devices,
                          gen_tokens=gen_tokens, codecs=codec_options(costs.d_model, codec_sweep))


def run(layers: int = 32, experts: int = 64, devices: int = 16, repeats: int = 50,
        seed: int = 0, *, codec_sweep) -> dict:
    """Median decision time of both workloads (single-pass, decoding with 64 new tokens);
    ``codec_sweep``: ``ec2moe codec-sweep``'s record or its path (the codec options, whose
    number sets the candidates per device).

    Raises:
      FileNotFoundError: ``codec_sweep`` is a missing path (the message names its command).
    """
    load_before = os.getloadavg()
    out = {}
    for name, gen in (("single_pass", 0), ("decoding", 64)):
        inst = _instance(layers, experts, devices, gen, seed, codec_sweep)
        times = _time(inst, repeats)
        out[name] = {"median_ms": 1e3 * float(np.median(times)),
                     "p90_ms": 1e3 * float(np.quantile(times, 0.9)),
                     "min_ms": 1e3 * float(np.min(times))}
    cands = (layers + 1) * 3 * inst.codec_bytes.shape[0] * inst.batch.shape[0]
    return {
        "benchmark": "scheduler_decision_time",
        "method": f"measured on this CPU ({_cpu_model()}, {os.cpu_count()} cores, shared with "
                  f"another engineer's niced jobs), jax {jax.__version__}, one jitted "
                  "schedule() call per repeat after compilation, new bandwidth values each "
                  "repeat; median over repeats",
        "load_average_1_5_15min": {"before": [round(x, 2) for x in load_before],
                                   "after": [round(x, 2) for x in os.getloadavg()]},
        "instance": {"layers": layers, "experts": experts, "end_devices": devices,
                     "candidates_per_device": cands,
                     "best_response_rounds": "at most 3 (stops after a round without moves)"},
        "repeats": repeats,
        "workloads": out,
        "median_ms": max(v["median_ms"] for v in out.values()),
        "target_ms": 10.0,
        "recompiles_after_first": int(schedule._cache_size()) - 1,
    }
