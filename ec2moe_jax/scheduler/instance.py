"""Builds a scheduling :class:`~ec2moe_jax.scheduler.model.Instance` from the project's types
(model costs, routing statistics, device and link profiles), validating every input here so
bad values fail with their value in the message and never inside a jitted function.

Shape legend: L layers, M MoE layers, E experts, N end devices, C codec options.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from ec2moe_jax.models.costs import ModelCosts
from ec2moe_jax.profiles import DeviceProfile, LinkProfile
from ec2moe_jax.scheduler.model import Instance

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODEC_SWEEP = os.path.join(ROOT, "results", "codec_sweep.json")
BATCH_SIZES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Achieved fractions of a device's roofline and fixed costs per stage call and per layer
    (the coefficients of :func:`~ec2moe_jax.scheduler.model.stage_time`).

    ``eta_flops`` scales available FLOP/s, ``eta_bw`` available memory bandwidth,
    ``overhead_s`` is paid once per job (dispatch, kernel launches), ``layer_overhead_s`` once
    per transformer layer of a job (its XLA ops; collectives on a sharded mesh). It comes last
    so that positional ``Calibration(eta_flops, eta_bw, overhead_s, source)`` keeps working
    (with no per-layer cost). Defaults are round values of the development CPU's fit; load
    ``results/calibration_cpu.json`` with :func:`load_calibration` to use the exact fit.
    """

    eta_flops: float = 0.3
    eta_bw: float = 0.5
    overhead_s: float = 2e-4
    source: str = "default (rounded CPU fit)"
    layer_overhead_s: float = 0.0

    def __post_init__(self):
        for f in ("eta_flops", "eta_bw"):
            v = getattr(self, f)
            if not 0 < v <= 10:
                raise ValueError(f"Calibration {f}={v} must lie in (0, 10] (a fraction of the "
                                 "profile's roofline; above 1 only where caches beat it)")
        if self.overhead_s < 0 or self.layer_overhead_s < 0:
            raise ValueError(f"Calibration overhead_s={self.overhead_s} and layer_overhead_s="
                             f"{self.layer_overhead_s} must be >= 0")


def load_calibration(path: str = os.path.join(ROOT, "results", "calibration_cpu.json")
                     ) -> Calibration:
    """The fitted coefficients of ``infer/calibrate.py``; the defaults if the file is absent."""
    if not os.path.exists(path):
        return Calibration()
    with open(path) as f:
        fit = json.load(f)["fit"]
    # An efficiency above 1 means this CPU's caches beat a roofline measured under
    # contention; a spec-sheet preset's peak is a hard ceiling, so clamp to it.
    ef, eb = min(fit["eta_flops"], 1.0), min(fit["eta_bw"], 1.0)
    return Calibration(ef, eb, fit["overhead_s"],
                       f"fitted on this CPU ({os.path.basename(path)}), clamped to <= 1",
                       fit.get("layer_overhead_s", 0.0))


@dataclasses.dataclass(frozen=True)
class CodecOption:
    name: str
    rank: int
    bytes_per_token: float
    quality: float  # relative bits/char increase over bf16 (codec sweep)


def codec_options(d_model: int, path: str = CODEC_SWEEP) -> list[CodecOption]:
    """Codec choices for a model of width ``d_model``: "none" (bf16 hidden state, 2 D bytes
    per token) and the Pareto-optimal (bytes, quality) points of the measured codec sweep.

    The sweep was measured at split 2 of the small model (D = 256); for another width the
    rank is scaled by ``D / 256`` and the quality loss is assumed to carry over (*ours*, an
    assumption, not a measurement).
    """
    opts = [CodecOption("none", d_model, 2.0 * d_model, 0.0)]
    if os.path.exists(path):
        with open(path) as f:
            sweep = json.load(f)["sweep"]
        d0 = 256
        for r in sweep:
            rank = max(1, round(r["rank"] * d_model / d0))
            per = 4 + (rank if r["bits"] == "int8" else (rank + 1) / 2)
            opts.append(CodecOption(f"{r['bits']}-r{rank}", rank, float(per),
                                    float(r["relative_increase_vs_bf16"])))
    pareto = [o for o in opts if not any(
        (p.bytes_per_token <= o.bytes_per_token and p.quality <= o.quality)
        and (p.bytes_per_token < o.bytes_per_token or p.quality < o.quality) for p in opts)]
    return sorted(pareto, key=lambda o: -o.bytes_per_token)


def _expand_freq(costs: ModelCosts, frequencies) -> np.ndarray:
    f = np.asarray(frequencies, np.float64)
    m = int(costs.is_moe.sum())
    if f.shape != (m, costs.num_experts):
        raise ValueError(f"routing statistics have shape {f.shape}; the model has {m} MoE "
                         f"layers x {costs.num_experts} experts")
    if not np.all(np.isfinite(f)) or np.any(f < 0):
        raise ValueError("routing statistics must be finite and >= 0")
    tot = f.sum(-1)
    if np.any(tot <= 0):
        raise ValueError(f"routing statistics are empty for MoE layers {np.flatnonzero(tot <= 0)}"
                         " (all counts 0): collect statistics on real text first "
                         "(ec2moe_jax.models.routing_stats) or pass uniform frequencies")
    full = np.full((costs.num_layers, costs.num_experts), 1.0 / costs.num_experts)
    full[costs.is_moe] = -np.sort(-(f / tot[:, None]), axis=-1)
    return full


def build_instance(
    costs: ModelCosts,
    frequencies,
    ends: Sequence[DeviceProfile],
    cloud: DeviceProfile,
    links: Sequence[LinkProfile],
    rates: Sequence[float],
    *,
    prompt_tokens: int = 128,
    gen_tokens: int = 0,
    calibration: Calibration | None = None,
    cloud_calibration: Calibration | None = None,
    min_end_layers: Sequence[int] | int = 0,
    min_coverage: float = 0.9,
    codec_budget: float = 0.02,
    storage_bw: float = 1e9,
    codecs: Sequence[CodecOption] | None = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> Instance:
    """Validates the inputs and assembles the :class:`Instance`.

    Args:
      costs: the model's :class:`~ec2moe_jax.models.costs.ModelCosts`.
      frequencies: [M, E] routing counts or frequencies of the MoE layers.
      ends, links, rates: one device profile, link and request rate (requests/s) per end.
      cloud: the cloud's profile (one server shared by all ends).
      prompt_tokens, gen_tokens: T and G (G = 0: single-pass workload).
      calibration: roofline efficiencies of the end devices (default :class:`Calibration`);
        ``cloud_calibration`` the cloud's (default the same).
      min_end_layers: privacy, per device or for all: layers that must run on the end.
      min_coverage: routing mass each end MoE layer's resident experts must cover.
      codec_budget: largest allowed relative bits/char increase of a codec.
      storage_bw: bytes/s at which an end swaps experts in from storage.
    """
    n = len(ends)
    if n == 0 or len(links) != n or len(rates) != n:
        raise ValueError(f"need one link and one rate per end device: {n} ends, "
                         f"{len(links)} links, {len(rates)} rates (at least one end)")
    rates = np.asarray(rates, np.float64)
    if not np.all(np.isfinite(rates)) or np.any(rates <= 0):
        raise ValueError(f"request rates {rates} must be finite and > 0 (requests/s)")
    for lk in links:
        if not isinstance(lk, LinkProfile):
            raise ValueError(f"links must be LinkProfile (which rejects zero bandwidth and "
                             f"negative RTT), got {lk!r}")
    if prompt_tokens < 1 or gen_tokens < 0:
        raise ValueError(f"{prompt_tokens=} must be >= 1 and {gen_tokens=} >= 0")
    if not 0 < min_coverage <= 1:
        raise ValueError(f"{min_coverage=} must lie in (0, 1]")
    if codec_budget < 0 or storage_bw <= 0:
        raise ValueError(f"{codec_budget=} must be >= 0 and {storage_bw=} > 0")
    priv = np.broadcast_to(np.asarray(min_end_layers, np.int32), (n,))
    if np.any(priv < 0) or np.any(priv > costs.num_layers):
        raise ValueError(f"min_end_layers={priv.tolist()} must lie in [0, {costs.num_layers}]")
    cal = calibration or Calibration()
    ccal = cloud_calibration or cal
    codecs = list(codecs) if codecs is not None else codec_options(costs.d_model)
    # Options over the quality budget can never be chosen: drop them (fewer candidates).
    codecs = [c for c in codecs if c.name == "none" or c.quality <= codec_budget]
    if codecs[0].name != "none":
        raise ValueError("codec option 0 must be 'none' (the uncompressed baseline)")
    if list(batch_sizes)[0] != 1:
        raise ValueError(f"{batch_sizes=} must start with 1 (the baselines' micro-batch)")
    f32 = lambda x: jnp.asarray(np.asarray(x, np.float64), jnp.float32)  # noqa: E731
    return Instance(
        fixed_flops=f32(costs.fixed_flops), fixed_bytes=f32(costs.fixed_bytes),
        is_moe=f32(costs.is_moe), expert_flops=f32(costs.expert_flops),
        expert_bytes=f32(costs.expert_bytes), attn_flops=f32(costs.attention_flops_per_position),
        kv_bytes=f32(costs.kv_bytes_per_position), embed_bytes=f32(costs.embed_bytes),
        head_bytes=f32(costs.head_bytes), head_flops=f32(costs.head_flops),
        d_model=f32(costs.d_model), top_k=f32(costs.top_k),
        freq=f32(_expand_freq(costs, frequencies)),
        end_flops=f32([d.available_flops * cal.eta_flops for d in ends]),
        end_bw=f32([d.available_bandwidth * cal.eta_bw for d in ends]),
        end_mem=f32([d.memory_bytes for d in ends]),
        end_overhead=f32([cal.overhead_s] * n),
        end_layer_overhead=f32([cal.layer_overhead_s] * n), storage_bw=f32([storage_bw] * n),
        link_bps=f32([lk.bandwidth_bps for lk in links]), rtt=f32([lk.rtt_s for lk in links]),
        rate=f32(rates), min_end_layers=jnp.asarray(priv, jnp.int32),
        cloud_flops=f32(cloud.available_flops * ccal.eta_flops),
        cloud_bw=f32(cloud.available_bandwidth * ccal.eta_bw),
        cloud_overhead=f32(ccal.overhead_s), cloud_layer_overhead=f32(ccal.layer_overhead_s),
        prompt_tokens=f32(prompt_tokens), gen_tokens=f32(gen_tokens),
        codec_bytes=f32([c.bytes_per_token for c in codecs]),
        codec_rank=f32([c.rank for c in codecs]),
        codec_quality=f32([c.quality for c in codecs]),
        batch=f32(list(batch_sizes)), min_coverage=f32(min_coverage),
        codec_budget=f32(codec_budget),
    )


def zipf_frequencies(num_layers: int, num_experts: int, alpha: float = 1.0,
                     seed: int = 0) -> np.ndarray:
    """[L, E] synthetic skewed routing frequencies (Zipf with a random expert order per
    layer), for instances without measured statistics."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, num_experts + 1) ** alpha
    f = np.stack([rng.permutation(base) for _ in range(num_layers)])
    return f / f.sum(-1, keepdims=True)


def random_small_instance(seed: int, max_devices: int = 3, layers: int | None = None,
                          experts: int = 4, devices: int | None = None) -> Instance:
    """A random small instance (top-1 over ``experts`` experts, 2-3 layers) in an interesting
    regime: skewed routing, end memory from 'nothing fits' to 'everything fits', 1-100 Mbps,
    10-100 ms RTT, devices 0.1-10 TFLOP/s, the cloud from idle to saturated, both workloads.
    Small enough for :func:`~ec2moe_jax.scheduler.exhaustive.optimum`."""
    from ec2moe_jax.config import ModelConfig, MoEConfig
    from ec2moe_jax.models.costs import model_costs
    from ec2moe_jax.profiles import device

    rng = np.random.default_rng(seed)
    layers = layers or int(rng.integers(2, 4))
    costs = model_costs(ModelConfig(d_model=256, num_layers=layers, num_heads=4, d_ff=512,
                                    moe=MoEConfig(num_experts=experts, top_k=1,
                                                  expert_dim=512)))
    n = int(rng.integers(1, max_devices + 1))
    n = devices or n  # a fixed shape lets tests share one compilation
    freq = zipf_frequencies(layers, experts, float(rng.uniform(0, 2)), seed=seed)
    full = costs.embed_bytes + costs.layer_bytes().sum() + costs.head_bytes
    ends = [DeviceProfile(f"end{i}", memory_bytes=float(rng.uniform(0, 1.3) * full),
                          peak_flops=float(10 ** rng.uniform(10, 12)),
                          mem_bandwidth=float(10 ** rng.uniform(9.5, 11)))
            for i in range(n)]
    links = [LinkProfile(f"l{i}", float(10 ** rng.uniform(6, 8)), float(rng.uniform(0.01, 0.1)))
             for i in range(n)]
    return build_instance(costs, freq, ends, device("t4").with_load(float(rng.uniform(0, 0.99))),
                          links, list(10 ** rng.uniform(0, 3, n)),
                          gen_tokens=int(rng.choice([0, 8])),
                          prompt_tokens=int(rng.choice([16, 128])),
                          codecs=codec_options(256)[:4], batch_sizes=(1, 4),
                          min_coverage=float(rng.uniform(0.5, 1.0)),
                          calibration=Calibration(layer_overhead_s=1e-4,
                                                  source="default + 0.1 ms per layer"))
