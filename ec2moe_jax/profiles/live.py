"""Live profile of the machine this runs on: free memory, a matmul probe, current load."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.profiles.device import DeviceProfile


def available_memory_bytes() -> float:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory via sysconf."""
    total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    try:
        with open("/proc/meminfo") as f:
            lines = f.readlines()
    except OSError:  # not Linux: total physical memory is the best we know
        return total
    for line in lines:
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) * 1024
    return total


def cpu_load() -> float:
    """1-minute load average over the core count, clipped to [0, 0.95]."""
    try:
        load = os.getloadavg()[0] / max(os.cpu_count() or 1, 1)
    except OSError:
        return 0.0
    return float(min(max(load, 0.0), 0.95))


def _median_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def measure(name: str = "this-machine", size: int = 1024, repeats: int = 5,
            memory_fraction: float = 0.5) -> DeviceProfile:
    """Profiles the default JAX device with a short fp32 matmul and a copy probe (measured).

    Args:
      size: square matmul side for the FLOP/s probe (2 size^3 FLOPs per run).
      repeats: timed runs per probe; medians are used.
      memory_fraction: share of the available memory offered to expert weights.
    """
    a = jnp.ones((size, size), jnp.float32)
    flops = 2 * size**3 / _median_seconds(jax.jit(lambda x: x @ x), a, repeats=repeats)
    big = jnp.ones((8 * size * size,), jnp.float32)  # 32 MiB at size 1024
    # A copy reads and writes every byte once.
    bandwidth = 2 * big.nbytes / _median_seconds(jax.jit(lambda x: x + 1.0), big,
                                                 repeats=repeats)
    platform = jax.devices()[0].platform
    return DeviceProfile(
        name, memory_bytes=available_memory_bytes() * memory_fraction, peak_flops=flops,
        mem_bandwidth=bandwidth, load=cpu_load() if platform == "cpu" else 0.0,
        dtype="float32", source=f"measured on {platform} ({size}^3 fp32 matmul, "
                                f"{big.nbytes >> 20} MiB copy, medians of {repeats})")
