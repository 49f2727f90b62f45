"""Plans the pipeline executes, and their construction: from the scheduler's joint
:class:`~ec2moe_jax.scheduler.Plan`, from a baseline name, or from a plan JSON; validated
with the values in the messages. Also the one-device scheduling instance the pipeline plans
on (:func:`instance`), EC2MoE's plan with the scheduler's baselines (:func:`scheduled_plans`)
and their predicted latency (:func:`predicted_latency`).

Shape legend: L layers, M MoE layers, E experts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from ec2moe_jax.codec import CodecSpec
from ec2moe_jax.config import ModelConfig
from ec2moe_jax.files import get_field, read_json
from ec2moe_jax.layers.quant import QuantSpec
from ec2moe_jax.models.costs import model_costs
from ec2moe_jax.profiles import DeviceProfile, LinkProfile
from ec2moe_jax.routing.masks import top_n_mask
from ec2moe_jax.scheduler import Calibration, CodecOption, Instance, Plan, build_instance, evaluate

BASELINES = ("cloud-only", "end-only", "end-only-drop", "end-only-swap", "best-split")
_SCHED_NAMES = {"cloud-only": "cloud_only", "end-only-drop": "end_only_drop",
                "end-only-swap": "end_only_swap", "best-split": "best_split"}


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    """One end device's plan *realised*, ready for :func:`~.stages.build_stages`: what the
    pipeline runs and a plan JSON file holds (see :func:`load_plan`).

    It differs from the scheduler's :class:`~ec2moe_jax.scheduler.Plan` (joint arrays over
    N devices with option *indices*, scored under jit) by naming its codec and micro-batch
    size and by carrying a label; :func:`from_scheduler` turns one device of a scheduler plan
    into it. The simulator's ``bench.sim.DevicePlan`` is only a timing key.

    Attributes:
      name: a label (baseline name, "ec2moe", or the JSON file).
      split: layers ``[0, split)`` run on the end.
      resident: <int>[L] resident experts per end layer (top-n by routing mass,
        :func:`ec2moe_jax.routing.top_n_mask`).
      codec: a :class:`~ec2moe_jax.codec.CodecSpec` name: "bf16" (the hidden state in
        bfloat16), "fp32" (lossless), "int8-r64", "int4-r96", "fp32-r64" (low-rank latents).
        Stored canonical: the old name "none" becomes "bf16".
      micro_batch: requests per micro-batch.
      swap: non-resident experts are read from storage when needed (end-only-swap): every
        expert stays usable, so the mask allows all; storage time is not emulated.
      experts: how the end stores its experts: "bf16" (the model's weights as they are),
        "int8" or "int4" weight-only (optionally "-g<group>", :class:`~ec2moe_jax.layers.
        QuantSpec`); the cloud always holds the model's own weights.
    """

    name: str
    split: int
    resident: tuple[int, ...]
    codec: str = "bf16"
    micro_batch: int = 1
    swap: bool = False
    experts: str = "bf16"

    def __post_init__(self):
        try:
            canonical = CodecSpec.parse(self.codec).name
            QuantSpec.parse(self.experts)
        except ValueError as e:
            raise ValueError(f"plan {self.name!r}: {e}") from None
        object.__setattr__(self, "codec", canonical)

    @property
    def spec(self) -> CodecSpec:
        """What crosses the link (:class:`~ec2moe_jax.codec.CodecSpec`)."""
        return CodecSpec.parse(self.codec)

    def validate(self, cfg: ModelConfig) -> PipelinePlan:
        L, E = cfg.num_layers, cfg.moe.num_experts
        if not 0 <= self.split <= L:
            raise ValueError(f"plan {self.name!r}: split={self.split} outside [0, {L}]")
        if len(self.resident) != L or any(not 0 <= n <= E for n in self.resident):
            raise ValueError(f"plan {self.name!r}: resident={list(self.resident)} must hold "
                             f"{L} counts in [0, {E}]")
        short = [i for i in range(self.split) if cfg.is_moe_layer(i) and not self.swap
                 and self.resident[i] < cfg.moe.top_k]
        if short:
            raise ValueError(f"plan {self.name!r}: end layers {short} keep fewer than top_k="
                             f"{cfg.moe.top_k} experts ({list(self.resident)})")
        if self.micro_batch < 1:
            raise ValueError(f"plan {self.name!r}: micro_batch={self.micro_batch} must be >= 1")
        try:
            self.spec.check(cfg.d_model)
            experts = QuantSpec.parse(self.experts)
            experts.groups(cfg.d_model), experts.groups(cfg.moe.expert_dim)
        except ValueError as e:
            raise ValueError(f"plan {self.name!r}: {e}") from None
        return self

    def allowed(self, frequencies: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        """<bool>[L, E] routing mask: the ``resident[l]`` most-used experts of each end MoE
        layer (``frequencies`` [M, E] of the MoE layers), everything elsewhere."""
        L, E = cfg.num_layers, cfg.moe.num_experts
        full = np.ones((L, E))
        moe = [i for i in range(L) if cfg.is_moe_layer(i)]
        freq = np.asarray(frequencies, np.float64)
        if freq.shape != (len(moe), E):
            raise ValueError(f"routing frequencies have shape {freq.shape}, expected "
                             f"{(len(moe), E)} (MoE layers x experts)")
        full[moe] = freq
        mask = top_n_mask(full, np.asarray(self.resident))
        end = np.arange(L)[:, None] < self.split
        return np.where(end & ~self.swap, mask, True)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"resident": list(self.resident)}


def load_plan(path: str, cfg: ModelConfig) -> PipelinePlan:
    """Reads and validates a plan JSON file for the model ``cfg``.

    The file is one JSON object: what ``PipelinePlan.to_json`` writes, e.g. the ``"plan"``
    object of an ``ec2moe generate`` or ``score`` record (extra keys such as ``"name"`` or
    ``"codec_source"`` are ignored)::

        field        type              meaning (default when missing)
        split        int in [0, L]     layers [0, split) run on the end device; 0 is
                                       cloud-only, L end-only (required)
        resident     int or [int] * L  experts kept resident per end layer, the most-used by
                                       routing mass; one int applies to every layer
                                       (default: all E experts); MoE end layers need >= top_k
        codec        str               what crosses the link at the split: "bf16" (hidden
                                       state in bfloat16), "fp32" (lossless), or low-rank
                                       latents "int8-r<R>", "int4-r<R>", "fp32-r<R>" with
                                       1 <= R <= D (default "bf16"; "none", the name before
                                       this vocabulary, is read as "bf16")
        micro_batch  int >= 1          requests per micro-batch (default 1)
        swap         bool              non-resident experts are swapped in from storage
                                       instead of dropped, so every expert stays usable
                                       (default false)
        experts      str               how the end stores its experts: "bf16", "int8",
                                       "int4" or "int<8|4>-g<group>" (default "bf16")

    Example (4 layers, 8 experts: two end layers keeping 6 experts, rank-64 int8 codec)::

        {"split": 2, "resident": [6, 6, 8, 8], "codec": "int8-r64", "micro_batch": 1,
         "swap": false}

    A low-rank codec uses the fine-tuned codec saved in the run for this split, rank and
    precision if there is one, else a PCA initialisation on training text.

    Types are strict: ``"swap": "false"`` or ``"split": 1.0`` is an error, not a guess.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file is not JSON or not an object, ``split`` is missing, a field has
        the wrong type, or a value is out of range (the message names the file, the field
        and the value).
    """
    d = read_json(path, what="plan JSON")
    kw = {"path": path, "what": "plan JSON"}
    split = get_field(d, "split", int, **kw)
    res = get_field(d, "resident", (int, list), **kw, default=cfg.moe.num_experts)
    if isinstance(res, list) and not all(isinstance(r, int) and not isinstance(r, bool)
                                         for r in res):
        raise ValueError(f"plan JSON {path!r}: field 'resident' must be an int or a list of "
                         f"ints, got {res!r}")
    res = [res] * cfg.num_layers if isinstance(res, int) else res
    codec = get_field(d, "codec", str, **kw, default="bf16")
    micro_batch = get_field(d, "micro_batch", int, **kw, default=1)
    swap = get_field(d, "swap", bool, **kw, default=False)
    experts = get_field(d, "experts", str, **kw, default="bf16")
    try:
        return PipelinePlan(os.path.basename(path), split, tuple(res), codec, micro_batch,
                            swap, experts).validate(cfg)
    except ValueError as e:
        raise ValueError(f"plan JSON {path!r}: {e}") from None


def from_scheduler(plan: Plan, inst: Instance, cfg: ModelConfig, name: str = "ec2moe",
                   device: int = 0) -> PipelinePlan:
    """Device ``device`` of a scheduler :class:`~ec2moe_jax.scheduler.Plan` on ``inst``,
    realised: the codec option index becomes its name (``inst.codec_specs``), the micro-batch
    option its size, the end's expert format the instance's."""
    ci = int(np.asarray(plan.codec)[device])
    return PipelinePlan(
        name, int(np.asarray(plan.split)[device]),
        tuple(int(n) for n in np.asarray(plan.resident)[device]), inst.codec_name(ci),
        int(np.asarray(inst.batch)[int(np.asarray(plan.batch)[device])]),
        bool(np.asarray(plan.swap)[device]), inst.end_experts).validate(cfg)


def baseline(name: str, cfg: ModelConfig, inst: Instance | None = None) -> PipelinePlan:
    """A baseline by name (:data:`BASELINES`). With a scheduling instance the scheduler's
    own baseline plans are used (end-only keeps what fits the device; best-split is the
    best uniform split); without one, cloud-only is split 0, end-only is split L with every
    expert and best-split needs the instance."""
    if name not in BASELINES:
        raise ValueError(f"unknown plan {name!r}; expected a plan JSON or one of "
                         f"{list(BASELINES)} (or 'ec2moe' where a scheduler runs)")
    L, E = cfg.num_layers, cfg.moe.num_experts
    if inst is None:
        if name == "cloud-only":
            return PipelinePlan(name, 0, (0,) * L)
        if name.startswith("end-only"):
            return PipelinePlan(name, L, (E,) * L)
        raise ValueError("best-split needs a device and link profile (a scheduling instance)")
    from ec2moe_jax.scheduler.plan import baseline_plans

    key = _SCHED_NAMES.get(name, "end_only_drop")
    return from_scheduler(baseline_plans(inst)[key], inst, cfg, name)


def instance(cfg: ModelConfig, freq, end: DeviceProfile, link: LinkProfile, cal: Calibration,
             *, prompt_tokens: int, gen_tokens: int, codecs: Sequence[CodecOption] | None,
             rate: float = 0.05, cloud_cal: Calibration | None = None) -> Instance:
    """A one-device scheduling instance for ``cfg``'s model with ``end`` as both the end and
    the cloud device (this machine runs both submeshes).

    Args:
      freq: [M, E] routing counts or frequencies of the MoE layers.
      cal, cloud_cal: the end's and the cloud's calibrations (default: ``cal`` for both);
        see :func:`ec2moe_jax.scheduler.this_cpu`.
      prompt_tokens, gen_tokens: T and G of a request (G = 0: scoring).
      codecs: codec options (:func:`ec2moe_jax.scheduler.codec_options` of the model width
        and the codec sweep), or None for bf16 only.
      rate: requests/s; the default is low enough that queueing is negligible, so the
        predicted latency is one request's (what the executor measures).
    """
    return build_instance(model_costs(cfg), freq, [end], end, [link], [rate],
                          prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, calibration=cal,
                          cloud_calibration=cloud_cal, codecs=codecs)


def scheduled_plans(cfg: ModelConfig, inst: Instance) -> dict[str, tuple[PipelinePlan, Plan]]:
    """EC2MoE's plan and the scheduler's baselines on a one-device ``inst``, as
    ``{name: (pipeline plan, scheduler plan)}``: "ec2moe", "cloud-only", "end-only-drop",
    "end-only-swap", "best-split".

    Raises:
      ValueError: no feasible plan exists (see
        :func:`~ec2moe_jax.scheduler.plan.schedule_checked`).
    """
    from ec2moe_jax.scheduler.plan import baseline_plans, schedule_checked

    plan, _ = schedule_checked(inst)
    out = {"ec2moe": (from_scheduler(plan, inst, cfg, "ec2moe"), plan)}
    for key, p in baseline_plans(inst).items():
        name = key.replace("_", "-")
        out[name] = (from_scheduler(p, inst, cfg, name), p)
    return out


def predicted_latency(inst: Instance, plan: Plan) -> float:
    """Seconds: the cost model's mean request latency of the joint ``plan`` on ``inst``
    (``inf`` when unstable)."""
    return float(evaluate(inst, plan)["mean_latency_s"])


def full_frequencies(cfg: ModelConfig, frequencies) -> np.ndarray:
    """[M, E] MoE-layer frequencies (uniform if None)."""
    m = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    if frequencies is None:
        return np.full((m, cfg.moe.num_experts), 1.0 / cfg.moe.num_experts)
    return np.asarray(frequencies, np.float64)
