"""Device and link profiles: the one definition HL-GGN selection and the scheduler share.

Profiles are frozen dataclasses of plain floats (bytes, FLOP/s, bytes/s, seconds), validated
on construction so a bad profile fails here with its value in the message, never deep inside
a jitted function. ``as_array`` gives the pytree-of-arrays form pure functions consume.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """What a device can offer to MoE inference right now.

    Attributes:
      name: a label ("jetson-orin-nano-8gb", "this-machine", ...).
      memory_bytes: memory available for model weights (experts), in bytes.
      peak_flops: peak dense FLOP/s at the dtype the device runs (see ``dtype``).
      mem_bandwidth: memory bandwidth, bytes/s.
      load: fraction of the device already busy, in [0, 1).
      dtype: the arithmetic the FLOP/s figure refers to ("float32", "bfloat16", ...).
      source: where the figures come from (spec sheet, derivation, or "measured").
    """

    name: str
    memory_bytes: float
    peak_flops: float
    mem_bandwidth: float
    load: float = 0.0
    dtype: str = "float32"
    source: str = ""

    def __post_init__(self):
        for field in ("memory_bytes", "peak_flops", "mem_bandwidth", "load"):
            v = getattr(self, field)
            if not math.isfinite(v):
                raise ValueError(f"DeviceProfile {self.name!r}: {field}={v} must be finite")
        if self.memory_bytes < 0:
            raise ValueError(f"DeviceProfile {self.name!r}: memory_bytes={self.memory_bytes} "
                             "must be >= 0")
        if self.peak_flops <= 0:
            raise ValueError(f"DeviceProfile {self.name!r}: peak_flops={self.peak_flops} must "
                             "be > 0")
        if self.mem_bandwidth <= 0:
            raise ValueError(f"DeviceProfile {self.name!r}: mem_bandwidth="
                             f"{self.mem_bandwidth} must be > 0")
        if not 0.0 <= self.load < 1.0:
            raise ValueError(f"DeviceProfile {self.name!r}: load={self.load} must lie in "
                             "[0, 1)")

    @property
    def available_flops(self) -> float:
        """FLOP/s left for us: ``peak * (1 - load)``."""
        return self.peak_flops * (1.0 - self.load)

    @property
    def available_bandwidth(self) -> float:
        return self.mem_bandwidth * (1.0 - self.load)

    def with_load(self, load: float) -> DeviceProfile:
        return dataclasses.replace(self, load=load)

    def with_memory(self, memory_bytes: float) -> DeviceProfile:
        return dataclasses.replace(self, memory_bytes=memory_bytes)

    def as_array(self) -> np.ndarray:
        """<float64>[4]: memory, available FLOP/s, available bandwidth, load."""
        return np.array([self.memory_bytes, self.available_flops, self.available_bandwidth,
                         self.load])


@dataclasses.dataclass(frozen=True)
class LinkProfile:
    """An end-to-cloud link: bandwidth (bits/s, as links are quoted) and round-trip time."""

    name: str
    bandwidth_bps: float
    rtt_s: float

    def __post_init__(self):
        if not (math.isfinite(self.bandwidth_bps) and self.bandwidth_bps > 0):
            raise ValueError(f"LinkProfile {self.name!r}: bandwidth_bps={self.bandwidth_bps} "
                             "must be > 0 (a dead link is no link: plan end-only instead)")
        if not (math.isfinite(self.rtt_s) and self.rtt_s >= 0):
            raise ValueError(f"LinkProfile {self.name!r}: rtt_s={self.rtt_s} must be >= 0")

    def transfer_seconds(self, num_bytes: float) -> float:
        """One-way time to send ``num_bytes``: serialisation plus half the round trip."""
        return 8.0 * num_bytes / self.bandwidth_bps + self.rtt_s / 2
