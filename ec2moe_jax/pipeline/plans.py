"""Plans the pipeline executes: from the scheduler's :class:`~ec2moe_jax.scheduler.Plan`,
from a baseline name, or from a plan JSON; validated with the values in the messages.

Shape legend: L layers, M MoE layers, E experts.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np

from ec2moe_jax.config import ModelConfig
from ec2moe_jax.pipeline.stages import Transport

BASELINES = ("cloud-only", "end-only", "end-only-drop", "end-only-swap", "best-split")
_SCHED_NAMES = {"cloud-only": "cloud_only", "end-only-drop": "end_only_drop",
                "end-only-swap": "end_only_swap", "best-split": "best_split"}


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    """One end device's plan, ready for :func:`~.stages.build_stages`.

    Attributes:
      name: a label (baseline name, "ec2moe", or the JSON file).
      split: layers ``[0, split)`` run on the end.
      resident: <int>[L] resident experts per end layer (top-n by routing mass).
      codec: "none" (bfloat16 hidden state), "float32" (lossless), or "<bits>-r<rank>"
        ("int8-r64", "int4-r96", ...), the scheduler's codec option names.
      micro_batch: requests per micro-batch.
      swap: non-resident experts are read from storage when needed (end-only-swap): every
        expert stays usable, so the mask allows all; storage time is not emulated.
    """

    name: str
    split: int
    resident: tuple[int, ...]
    codec: str = "none"
    micro_batch: int = 1
    swap: bool = False

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
        self.transport(cfg.d_model)
        return self

    def transport(self, d_model: int) -> Transport:
        if self.codec == "none":
            return Transport("bfloat16")
        if self.codec == "float32":
            return Transport("float32")
        bits, _, rank = self.codec.partition("-r")
        if bits not in ("int8", "int4") or not rank.isdigit() or not 1 <= int(rank) <= d_model:
            raise ValueError(f"plan {self.name!r}: codec {self.codec!r} must be 'none', "
                             f"'float32' or '<int8|int4>-r<rank in [1, {d_model}]>'")
        return Transport(bits, int(rank))

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
        rank = np.argsort(np.argsort(-full, -1, kind="stable"), -1, kind="stable")
        mask = rank < np.asarray(self.resident)[:, None]
        end = np.arange(L)[:, None] < self.split
        return np.where(end & ~self.swap, mask, True)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"resident": list(self.resident)}


def load_plan(path: str, cfg: ModelConfig) -> PipelinePlan:
    """A plan JSON: ``{"split", "resident" (list or one int), "codec", "micro_batch",
    "swap"}`` (missing: all experts resident, no codec, micro-batch 1)."""
    with open(path) as f:
        d = json.load(f)
    L = cfg.num_layers
    res = d.get("resident", cfg.moe.num_experts)
    res = [int(res)] * L if isinstance(res, int) else [int(r) for r in res]
    return PipelinePlan(os.path.basename(path), int(d["split"]), tuple(res),
                        d.get("codec", "none"), int(d.get("micro_batch", 1)),
                        bool(d.get("swap", False))).validate(cfg)


def from_scheduler(plan, inst, cfg: ModelConfig, name: str = "ec2moe", device: int = 0,
                   codec_names: list[str] | None = None) -> PipelinePlan:
    """Device ``device`` of a scheduler :class:`~ec2moe_jax.scheduler.Plan` on ``inst``;
    ``codec_names``: the names of ``inst``'s codec options (default
    :func:`~ec2moe_jax.scheduler.codec_options` of the model width)."""
    from ec2moe_jax.scheduler import codec_options

    names = codec_names or [c.name for c in codec_options(cfg.d_model)]
    ci = int(np.asarray(plan.codec)[device])
    if ci >= len(names):
        raise ValueError(f"plan codec index {ci} has no name among {names}")
    return PipelinePlan(
        name, int(np.asarray(plan.split)[device]),
        tuple(int(n) for n in np.asarray(plan.resident)[device]), names[ci],
        int(np.asarray(inst.batch)[int(np.asarray(plan.batch)[device])]),
        bool(np.asarray(plan.swap)[device])).validate(cfg)


def baseline(name: str, cfg: ModelConfig, inst=None, codec_names=None) -> PipelinePlan:
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
    plan = baseline_plans(inst)[key]
    return from_scheduler(plan, inst, cfg, name, codec_names=codec_names)


def full_frequencies(cfg: ModelConfig, frequencies) -> jnp.ndarray:
    """[M, E] MoE-layer frequencies (uniform if None)."""
    m = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    if frequencies is None:
        return np.full((m, cfg.moe.num_experts), 1.0 / cfg.moe.num_experts)
    return np.asarray(frequencies, np.float64)
