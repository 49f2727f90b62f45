"""Synthetic LTE-like bandwidth traces with step drops (*ours*; documented parameters, not
fitted to a dataset).

Model: log-bandwidth is a stationary Gaussian AR(1) process sampled every ``step_s``;
bandwidth is log-normal with the given mean and coefficient of variation, and correlation
time ``corr_s`` (``phi = exp(-step_s / corr_s)``), clipped to ``[floor, ceil] x mean``. The
defaults (CV 0.5, 3 s correlation time, 0.5 s steps) give the seconds-scale swings of
measured 4G/LTE throughput logs (e.g. the Ghent 4G/LTE dataset, van der Hooft et al., IEEE
Commun. Lett. 2016) without claiming to reproduce any one of them. A step drop multiplies
the bandwidth by ``factor`` over ``[start, start + duration)`` (rounded to the step grid):
a handover, a tunnel, a congested cell. :class:`Drop` itself lives with the link
(:mod:`ec2moe_jax.pipeline.link`, re-exported here), as does a constant trace with exact
drops: :meth:`~ec2moe_jax.pipeline.link.BandwidthTrace.constant`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ec2moe_jax.pipeline.link import BandwidthTrace, Drop

__all__ = ["Drop", "LteParams", "lte_trace"]


@dataclasses.dataclass(frozen=True)
class LteParams:
    """Parameters of :func:`lte_trace` (see the module docstring)."""

    mean_bps: float
    cv: float = 0.5
    corr_s: float = 3.0
    step_s: float = 0.5
    floor: float = 0.05
    ceil: float = 4.0

    def __post_init__(self):
        if not self.mean_bps > 0 or self.cv < 0 or self.corr_s <= 0 or self.step_s <= 0:
            raise ValueError(f"{self}: mean_bps, corr_s and step_s must be > 0 and cv >= 0")
        if not 0 < self.floor <= 1 <= self.ceil:
            raise ValueError(f"{self}: need 0 < floor <= 1 <= ceil")


def lte_trace(params: LteParams, horizon_s: float, seed: int,
              drops: tuple[Drop, ...] = ()) -> BandwidthTrace:
    """A piecewise-constant trace over ``[0, horizon_s)`` (the last value holds after)."""
    if horizon_s <= 0:
        raise ValueError(f"{horizon_s=} must be > 0")
    n = max(1, int(np.ceil(horizon_s / params.step_s)))
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(np.log1p(params.cv**2))
    phi = np.exp(-params.step_s / params.corr_s)
    x = np.empty(n)
    x[0] = rng.normal(0.0, sigma)
    eps = rng.normal(0.0, sigma * np.sqrt(1 - phi**2), n)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + eps[t]
    bps = params.mean_bps * np.exp(x - sigma**2 / 2)
    bps = np.clip(bps, params.floor * params.mean_bps, params.ceil * params.mean_bps)
    times = np.arange(n) * params.step_s
    for d in drops:
        bps = np.where((times >= d.start_s) & (times < d.start_s + d.duration_s),
                       bps * d.factor, bps)
    return BandwidthTrace(tuple(float(t) for t in times), tuple(float(b) for b in bps))

