"""Builds a scheduling :class:`~ec2moe_jax.scheduler.model.Instance` from the project's types
(model costs, routing statistics, device and link profiles), validating every input here so
bad values fail with their value in the message and never inside a jitted function.

Shape legend: L layers, M MoE layers, E experts, N end devices, C codec options.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from ec2moe_jax.codec import BF16, CodecSpec
from ec2moe_jax.files import read_json
from ec2moe_jax.layers.quant import QuantSpec
from ec2moe_jax.models.costs import ModelCosts
from ec2moe_jax.profiles import DeviceProfile, LinkProfile
from ec2moe_jax.scheduler.calibrate import Calibration
from ec2moe_jax.scheduler.model import Instance

BATCH_SIZES = (1, 2, 4, 8)
CODEC_SWEEP_COMMAND = "ec2moe codec-sweep"  # writes results/codec_sweep.json
SWEEP_D_MODEL = 256  # width of the model the codec sweep was measured on (the small config)


@dataclasses.dataclass(frozen=True)
class CodecOption:
    """A codec the scheduler may choose for a model of width ``d_model``.

    Attributes:
      spec: what crosses the link (:class:`~ec2moe_jax.codec.CodecSpec`).
      d_model: the model width D, which sizes a raw hidden state.
      quality: relative bits/char increase over bf16 (from the codec sweep; 0 for bf16).
    """

    spec: CodecSpec
    d_model: int
    quality: float = 0.0

    def __post_init__(self):
        self.spec.check(self.d_model)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def rank(self) -> int:
        """Values per token on the wire: R, or D for a raw hidden state."""
        return self.spec.width(self.d_model)

    @property
    def bytes_per_token(self) -> float:
        return self.spec.bytes_per_token(self.d_model)


def codec_options(d_model: int, sweep: dict | str | os.PathLike) -> list[CodecOption]:
    """Codec choices for a model of width ``d_model``: bf16 (the hidden state, 2 D bytes per
    token) and the Pareto-optimal (bytes, quality) points of the measured codec sweep,
    largest first (bf16 is always option 0).

    The sweep was measured at split 2 of the small model (D = 256); for another width the
    rank is scaled by ``D / 256`` and the quality loss is assumed to carry over (*ours*, an
    assumption, not a measurement). Bytes per token come from the wire format
    (:meth:`~ec2moe_jax.codec.CodecSpec.bytes_per_token`).

    Args:
      d_model: the model width D.
      sweep: ``ec2moe codec-sweep``'s record (``results/codec_sweep.json``), loaded or its
        path.

    Raises:
      FileNotFoundError: ``sweep`` is a path that does not exist (the message names
        ``ec2moe codec-sweep``).
    """
    if not isinstance(sweep, dict):
        sweep = read_json(sweep, what="the codec sweep", command=CODEC_SWEEP_COMMAND)
    opts = [CodecOption(BF16, d_model)]
    for r in sweep["sweep"]:
        rank = min(d_model, max(1, round(r["rank"] * d_model / SWEEP_D_MODEL)))
        opts.append(CodecOption(CodecSpec(r["bits"], rank), d_model,
                                float(r["relative_increase_vs_bf16"])))
    pareto = [o for o in opts if not any(
        (p.bytes_per_token <= o.bytes_per_token and p.quality <= o.quality)
        and (p.bytes_per_token < o.bytes_per_token or p.quality < o.quality) for p in opts)]
    return sorted(pareto, key=lambda o: -o.bytes_per_token)


QUALITY_MEMORY_COMMAND = "ec2moe bench-quality-memory"  # writes results/quality_memory.json


@dataclasses.dataclass(frozen=True)
class ResidencyQuality:
    """Measured quality loss of an end that holds only some of its layers' experts: the
    scheduler's quality budget on evidence instead of the routing-mass proxy (*ours*).

    Attributes:
      fractions: ascending resident shares of the end layers' experts at which the loss was
        measured (experts resident / experts of the end MoE layers).
      loss: relative bits/char increase over the full model at each fraction.
      experts: the format the end stored its experts in when measured ("bf16", "int8",
        "int4"); the scheduler counts end memory in that format.
      source: where the figures come from (file, model, method).

    A plan holding ``n`` of ``E`` experts in an end layer is charged the measured loss at
    the largest measured fraction ``<= n / E`` after taking the non-increasing upper
    envelope (noise never makes more experts look worse than fewer): a pessimistic step
    function. Below the smallest measured fraction the loss is unknown and the plan is
    refused. The table was measured with a whole end (every end layer at that share); it is
    applied per layer (an approximation, stated where it is used).
    """

    fractions: tuple[float, ...]
    loss: tuple[float, ...]
    experts: str = "bf16"
    source: str = ""

    def __post_init__(self):
        f, q = np.asarray(self.fractions, np.float64), np.asarray(self.loss, np.float64)
        if f.ndim != 1 or f.shape != q.shape or f.size == 0:
            raise ValueError(f"fractions {self.fractions} and loss {self.loss} must be equal-"
                             "length, non-empty sequences")
        if np.any(np.diff(f) <= 0) or f[0] <= 0 or f[-1] > 1 or not np.all(np.isfinite(q)):
            raise ValueError(f"fractions {self.fractions} must increase within (0, 1] and "
                             f"loss {self.loss} be finite")
        QuantSpec.parse(self.experts)

    def loss_at(self, resident: np.ndarray, num_experts: int) -> np.ndarray:
        """<float64>[...] charged loss of holding ``resident`` [...] of ``num_experts``
        experts per layer (``inf`` below the smallest measured fraction)."""
        f = np.asarray(self.fractions, np.float64)
        envelope = np.maximum.accumulate(np.asarray(self.loss, np.float64)[::-1])[::-1]
        share = np.asarray(resident, np.float64) / num_experts
        i = np.searchsorted(f, share + 1e-9, side="right") - 1
        return np.where(i >= 0, envelope[np.clip(i, 0, None)], np.inf)

    @classmethod
    def from_quality_memory(cls, record: dict | str | os.PathLike, model: str,
                            variant: str) -> ResidencyQuality:
        """The table of one model and method (``lm/experts/router``) of ``ec2moe
        bench-quality-memory``'s record (``results/quality_memory.json``), loaded or a path.

        Raises:
          FileNotFoundError: a path that does not exist (the message names the command).
          ValueError: the model or method is not in the record (the message lists them).
        """
        if not isinstance(record, dict):
            record = read_json(record, what="the quality-memory results",
                               command=QUALITY_MEMORY_COMMAND)
        entry = record.get("models", {}).get(model) if isinstance(record, dict) else None
        if entry is None:
            models = sorted(record.get("models", {})) if isinstance(record, dict) else []
            raise ValueError(f"model {model!r} not in the quality-memory results; it has "
                             f"{models} (rerun {QUALITY_MEMORY_COMMAND})")
        try:
            pts = sorted({p["resident_fraction"]: p["relative_increase"] for p in entry["points"]
                          if p["variant"] == variant and p["feasible"]}.items())
        except (KeyError, TypeError) as e:
            raise ValueError(f"the quality-memory results of {model!r} lack {e} (written by an "
                             f"older version? rerun {QUALITY_MEMORY_COMMAND})") from None
        if not pts:
            names = sorted({p["variant"] for p in entry["points"]})
            raise ValueError(f"method {variant!r} has no measured point for {model!r}; "
                             f"measured: {names}")
        return cls(tuple(f for f, _ in pts), tuple(max(q, 0.0) for _, q in pts),
                   experts=variant.split("/")[1],
                   source=f"{QUALITY_MEMORY_COMMAND}: {model} {variant}")

    def score_table(self, costs: ModelCosts) -> np.ndarray:
        """<float64>[L, E+1] minus the charged loss of holding the top n = 0..E experts (0 in
        dense layers, which hold no experts); a large negative number where unmeasured."""
        e = costs.num_experts
        loss = self.loss_at(np.arange(e + 1), e)
        row = -np.where(np.isfinite(loss), loss, 1e6)
        return np.where(costs.is_moe[:, None], row[None, :], 0.0)


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
    quality: ResidencyQuality | None = None,
    quality_budget: float = 0.03,
    end_experts: str | None = None,
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
      min_coverage: routing mass each end MoE layer's resident experts must cover (the
        proxy quality budget, used when ``quality`` is None).
      quality: the measured loss of holding fewer experts (:class:`ResidencyQuality`);
        with it a plan's end layers must each stay within ``quality_budget`` (relative
        bits/char increase) instead of covering ``min_coverage``.
      end_experts: how the ends store experts: None (as ``costs`` counts them), "bf16",
        "int8" or "int4" (:class:`~ec2moe_jax.layers.QuantSpec`, exact bytes with scales);
        default: ``quality``'s format when given, else None.
      codec_budget: largest allowed relative bits/char increase of a codec.
      storage_bw: bytes/s at which an end swaps experts in from storage.
      codecs: the codec options, bf16 first (:func:`codec_options` of the model width and
        the codec sweep); None: bf16 only (no compressed codec to choose from). Options over
        ``codec_budget`` are dropped.
      batch_sizes: micro-batch options, starting with 1.
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
    if quality_budget < 0:
        raise ValueError(f"{quality_budget=} must be >= 0 (a relative bits/char increase)")
    if end_experts is None and quality is not None:
        end_experts = quality.experts
    end_eb = costs.expert_bytes
    if end_experts is not None:
        d = costs.d_model
        f = round(costs.expert_flops / (6 * d))  # 3 matrices of D x F, 2 FLOPs each
        spec = QuantSpec.parse(end_experts)
        end_eb = float(spec.expert_bytes(d, f))
    if codec_budget < 0 or storage_bw <= 0:
        raise ValueError(f"{codec_budget=} must be >= 0 and {storage_bw=} > 0")
    priv = np.broadcast_to(np.asarray(min_end_layers, np.int32), (n,))
    if np.any(priv < 0) or np.any(priv > costs.num_layers):
        raise ValueError(f"min_end_layers={priv.tolist()} must lie in [0, {costs.num_layers}]")
    cal = calibration or Calibration()
    ccal = cloud_calibration or cal
    codecs = list(codecs) if codecs is not None else [CodecOption(BF16, costs.d_model)]
    # Options over the quality budget can never be chosen: drop them (fewer candidates).
    codecs = [c for c in codecs if c.spec == BF16 or c.quality <= codec_budget]
    if not codecs or codecs[0].spec != BF16:
        raise ValueError(f"codec option 0 must be {BF16.name!r} (the uncompressed baseline), "
                         f"got {[c.name for c in codecs]}")
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
        batch=f32(list(batch_sizes)),
        resident_score=f32(_coverage(costs, frequencies) if quality is None
                           else quality.score_table(costs)),
        min_score=f32(min_coverage if quality is None else -quality_budget),
        end_expert_bytes=f32(end_eb),
        codec_budget=f32(codec_budget), codec_specs=tuple(c.spec for c in codecs),
        score_kind="coverage" if quality is None else "quality_loss",
        end_experts=end_experts or "bf16",
    )


def _coverage(costs: ModelCosts, frequencies) -> np.ndarray:
    """<float64>[L, E+1] routing mass covered by the top n = 0..E experts (sorted
    frequencies; uniform rows for dense layers)."""
    cum = np.cumsum(_expand_freq(costs, frequencies), axis=-1)
    return np.concatenate([np.zeros_like(cum[:, :1]), cum], axis=-1)


def zipf_frequencies(num_layers: int, num_experts: int, alpha: float = 1.0,
                     seed: int = 0) -> np.ndarray:
    """[L, E] synthetic skewed routing frequencies (Zipf with a random expert order per
    layer), for instances without measured statistics."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, num_experts + 1) ** alpha
    f = np.stack([rng.permutation(base) for _ in range(num_layers)])
    return f / f.sum(-1, keepdims=True)


def random_small_instance(seed: int, max_devices: int = 3, layers: int | None = None,
                          experts: int = 4, devices: int | None = None, *,
                          codecs: Sequence[CodecOption]) -> Instance:
    """A random small instance (top-1 over ``experts`` experts, 2-3 layers, D = 256) in an
    interesting regime: skewed routing, end memory from 'nothing fits' to 'everything fits',
    1-100 Mbps, 10-100 ms RTT, devices 0.1-10 TFLOP/s, the cloud from idle to saturated, both
    workloads. Small enough for :func:`~ec2moe_jax.scheduler.exhaustive.optimum` with a few
    ``codecs`` (options of width 256, bf16 first; the report uses the first 4 of
    :func:`codec_options`)."""
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
                          codecs=codecs, batch_sizes=(1, 4),
                          min_coverage=float(rng.uniform(0.5, 1.0)),
                          calibration=Calibration(layer_overhead_s=1e-4,
                                                  source="default + 0.1 ms per layer"))
