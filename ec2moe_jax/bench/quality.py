"""The quality column of a simulated plan: bits/char of a knob-matched plan of the trained
*small* model, measured through the real pipeline on held-out text.

Timing is simulated for a large base config we cannot train here; quality is not simulated.
:func:`map_plan` turns a base-config plan into a :class:`QualityKey` (split depth, resident
fraction, codec rank, gate) of the small model by an approximate, documented mapping (ours),
and :func:`evaluate_keys` scores each distinct key once, caching the results per checkpoint.

Shape legend: L layers, M MoE layers, E experts, N windows, T window length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Iterable, Sequence

import numpy as np

from ec2moe_jax.codec import BF16, CodecSpec
from ec2moe_jax.config import ModelConfig
from ec2moe_jax.layers.quant import QuantSpec

GATES = ("group", "masked")


def _parse_codec(codec: str) -> CodecSpec:
    """The :class:`~ec2moe_jax.codec.CodecSpec` of a codec name; ValueError naming it."""
    try:
        return CodecSpec.parse(codec)
    except ValueError as e:
        raise ValueError(f"codec={codec!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class QualityKey:
    """One small-model configuration whose quality stands for a base-model plan.

    Attributes:
      end_layers: small-model layers run on the end, 0..L (0: cloud-only, L: end-only).
      resident: experts resident in every end MoE layer (E: all of them).
      gate: "group" (the HL-GGN group gate, trained for the mask if none is saved) or
        "masked" (the router restricted to the resident experts).
      codec: a codec name (:class:`~ec2moe_jax.codec.CodecSpec`) of the small model's
        width: "bf16" or "<int8|int4>-r<rank>" (stored canonical: "none" becomes "bf16").
      swap: non-resident experts are fetched when needed (the mask allows every expert).
      experts: how the end stores its experts ("bf16", "int8", "int4": weight-only,
        :class:`~ec2moe_jax.layers.QuantSpec`).
      end_slots: 0, or the experts resident over all end MoE layers together, handed out by
        routing mass as ``ec2moe bench-quality-memory`` does
        (:func:`~ec2moe_jax.bench.quality_memory.resident_mask`); ``resident`` is then
        ``end_slots`` over the end MoE layers, rounded down (a label). Keys of a measured
        quality budget use it, so the plan measured is the one the budget was measured on.
    """

    end_layers: int
    resident: int
    gate: str
    codec: str = BF16.name
    swap: bool = False
    experts: str = "bf16"
    end_slots: int = 0

    def __post_init__(self):
        if self.end_layers < 0:
            raise ValueError(f"end_layers={self.end_layers} must be >= 0")
        if self.resident < 1:
            raise ValueError(f"resident={self.resident} must be >= 1 expert per end layer")
        if self.gate not in GATES:
            raise ValueError(f"gate={self.gate!r} must be one of {list(GATES)}")
        object.__setattr__(self, "codec", _parse_codec(self.codec).name)
        QuantSpec.parse(self.experts)
        if self.end_slots < 0:
            raise ValueError(f"end_slots={self.end_slots} must be >= 0")

    def label(self) -> str:
        """A short unique name, e.g. ``"L2-n4-group-int8-r64"`` (``-swap``, ``-s<slots>``
        and ``-x<experts>`` appended when set). Keys cached before the codec vocabulary said
        "none" where this says "bf16"."""
        return (f"L{self.end_layers}-n{self.resident}-{self.gate}-{self.codec}"
                + ("-swap" if self.swap else "")
                + (f"-s{self.end_slots}" if self.end_slots else "")
                + (f"-x{self.experts}" if self.experts != "bf16" else ""))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> QualityKey:
        return cls(int(d["end_layers"]), int(d["resident"]), str(d["gate"]),
                   str(d.get("codec", BF16.name)), bool(d.get("swap", False)),
                   str(d.get("experts", "bf16")), int(d.get("end_slots", 0)))


def _moe_layers(cfg: ModelConfig, below: int) -> list[int]:
    return [i for i in range(below) if cfg.is_moe_layer(i)]


def map_plan(split: int, resident: Sequence[int], swap: bool, codec: str, *, gate: str,
             base_cfg: ModelConfig, small_cfg: ModelConfig, experts: str = "bf16",
             by_slots: bool = False) -> QualityKey:
    """The small-model :class:`QualityKey` of one device's base-model plan (our mapping, an
    approximation: the small model has fewer layers, experts and a narrower hidden state).

    Rules (primed quantities are the small model's):

    * cloud-only (``split == 0``): ``end_layers 0``, every expert, codec "bf16", no swap.
    * depth: with ``m`` base MoE layers below ``split`` of ``M`` in all, end-only
      (``split == L``) maps to ``L'``; a real split maps to
      ``clip(ceil(m / M * L'), 1, L' - 1)``: pessimistic (the affected depth rounds up) but
      still a split, so the codec still applies.
    * resident: with ``swap``, ``E'`` (every expert usable). Else ``frac`` = the smallest
      ``resident[l] / E`` over end MoE layers (1.0 if none) and
      ``resident' = max(top_k', floor(frac * E'))``: pessimistic (rounds down).
    * codec: ``"<bits>-r<r>"`` becomes ``"<bits>-r<r'>"``, ``r' = max(1, round(r D' / D))``
      (the same fraction of the width), a raw hidden state stays as it is; "bf16" when the
      small plan has no boundary (``end_layers`` 0 or ``L'``).
    * gate: "masked" whenever ``resident' == E'`` (nothing dropped: the router is exact).
    * ``by_slots`` (a measured quality budget): ``end_slots = floor(frac * m' E')`` experts
      over the ``m'`` small end MoE layers, handed out by routing mass as the budget's
      measurement did (the smallest per-layer share ``frac`` again: pessimistic).
    * ``experts``: the end's expert format, kept for any plan with end layers.

    Args:
      split: base layers ``[0, split)`` on the end.
      resident: <int>[L] base resident experts per layer (cloud layers ignored).
      swap: the plan swaps experts in from storage.
      codec: the base plan's codec option name ("bf16" or "<int8|int4>-r<rank>").
      gate: "group" or "masked", how a plan that drops experts routes its end layers.
      base_cfg, small_cfg: the simulated and the trained model configs.

    Returns:
      The :class:`QualityKey` to evaluate.
    """
    L, E = base_cfg.num_layers, base_cfg.moe.num_experts
    L2, E2, K2 = small_cfg.num_layers, small_cfg.moe.num_experts, small_cfg.moe.top_k
    if gate not in GATES:
        raise ValueError(f"gate={gate!r} must be one of {list(GATES)}")
    if not 0 <= split <= L:
        raise ValueError(f"split={split} outside [0, {L}] (the base model's layers)")
    if len(resident) != L or any(not 0 <= int(n) <= E for n in resident):
        raise ValueError(f"resident={list(resident)} must hold {L} counts in [0, {E}], one "
                         "per base layer (cloud layers may be 0)")
    parsed = _parse_codec(codec)
    if split == 0:
        return full_model_key(small_cfg)
    if split == L:
        end_layers = L2
    else:
        m, M = len(_moe_layers(base_cfg, split)), len(_moe_layers(base_cfg, L))
        end_layers = min(max(math.ceil(m / M * L2), 1), L2 - 1)
    if swap:
        res = E2
    else:
        fracs = [int(resident[i]) / E for i in _moe_layers(base_cfg, split)]
        # The epsilon keeps an exact fraction (e.g. 16/32 * 8 = 4) from flooring to 3.
        res = min(E2, max(K2, math.floor(min(fracs, default=1.0) * E2 + 1e-9)))
    small_codec = BF16.name
    if 0 < end_layers < L2:
        small_codec = parsed.name
        if parsed.lowrank:
            r2 = min(small_cfg.d_model,
                     max(1, round(parsed.rank * small_cfg.d_model / base_cfg.d_model)))
            small_codec = CodecSpec(parsed.kind, r2).name
    slots = 0
    if by_slots and not swap:
        m2 = len(_moe_layers(small_cfg, end_layers))
        fracs = [int(resident[i]) / E for i in _moe_layers(base_cfg, split)]
        slots = max(m2 * K2, math.floor(min(fracs, default=1.0) * m2 * E2 + 1e-9))
        res = slots // max(m2, 1)
        if slots >= m2 * E2:
            slots, res = 0, E2
    return QualityKey(end_layers, res, "masked" if res == E2 else gate, small_codec, bool(swap),
                      experts, slots)


def full_model_key(small_cfg: ModelConfig) -> QualityKey:
    """The cloud-only key: the unsplit model's quality."""
    return QualityKey(0, small_cfg.moe.num_experts, "masked", BF16.name, False)


def heldout_windows(test_tokens: np.ndarray, windows: int, window_len: int) -> np.ndarray:
    """<int32>[N, T + 1]: ``windows`` windows of ``window_len + 1`` tokens evenly spaced over
    the held-out split (deterministic, as :func:`~.pipeline_demo.demo_workload`)."""
    test = np.asarray(test_tokens)
    if windows < 1 or window_len < 1:
        raise ValueError(f"{windows=} and {window_len=} must be >= 1")
    if len(test) < window_len + 2:
        raise ValueError(f"the held-out split has {len(test)} tokens, fewer than "
                         f"window_len + 2 = {window_len + 2}; shorten window_len")
    starts = np.linspace(0, len(test) - window_len - 2, windows).astype(int)
    return np.stack([test[s:s + window_len + 1] for s in starts]).astype(np.int32)


def checkpoint_fingerprint(workdir: str) -> str:
    """The latest checkpoint step of ``workdir`` and its modification time: a cached result
    is reused only for the very checkpoint it was measured on."""
    from ec2moe_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(os.path.join(os.path.expanduser(workdir), "checkpoints"),
                        create=False)
    step = ckpt.latest_step()
    ckpt.close()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {workdir!r}/checkpoints; train first")
    mtime = os.stat(os.path.join(ckpt.directory, str(step))).st_mtime_ns
    return f"step{step}@{mtime}"


def _cache_id(key: QualityKey, windows: int, window_len: int, gate_steps: int,
              fingerprint: str) -> str:
    # gate_steps cannot change a masked key's result, so masked entries are shared.
    steps = gate_steps if key.gate == "group" else 0
    return f"{key.label()}|windows={windows}|len={window_len}|gate_steps={steps}|{fingerprint}"


def _read_cache(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("entries", {})


def _evaluate_one(run, meshes, key: QualityKey, texts: np.ndarray, *, workdir: str,
                  gate_steps: int) -> dict:
    from ec2moe_jax.pipeline import Channel, executor, runtime
    from ec2moe_jax.pipeline.plans import PipelinePlan
    from ec2moe_jax.profiles import link

    setup, params, splits, freq = run
    L = setup.cfg.model.num_layers
    if key.end_layers > L:
        raise ValueError(f"key {key.label()}: end_layers={key.end_layers} > the model's {L}")
    t0 = time.perf_counter()
    resident = tuple(key.resident if i < key.end_layers else 0 for i in range(L))
    if key.end_slots:
        from ec2moe_jax.bench.quality_memory import resident_mask

        mask = resident_mask(setup.cfg.model, freq, key.end_slots, key.end_layers)
        if mask is None:
            raise ValueError(f"key {key.label()}: {key.end_slots} experts cannot give each of "
                             f"the {key.end_layers} end layers one")
        resident = tuple(int(n) if i < key.end_layers else 0
                         for i, n in enumerate(mask.sum(-1)))
    plan = PipelinePlan(name=key.label(), split=key.end_layers, resident=resident,
                        codec=key.codec, micro_batch=16, swap=key.swap, experts=key.experts)
    use_gate = key.gate == "group"
    stages, info = runtime.prepare(setup.model, params, plan, *meshes, frequencies=freq,
                                   workdir=workdir, train_tokens=splits.train,
                                   gate_steps=gate_steps if use_gate else 0,
                                   use_gate=use_gate,
                                   gate_init_only=use_gate and gate_steps == 0)
    lp, _ = executor.score(stages, texts, channel=Channel.from_profile(link("wifi")),
                           micro_batch=plan.micro_batch)
    return {"bits_per_char": float(-np.mean(lp) / np.log(2)), "gate": info["gate"],
            "codec_source": info["codec_source"],
            "routing_mass_covered_per_end_layer": info["routing_mass_covered_per_end_layer"],
            "seconds": time.perf_counter() - t0, "plan": plan.to_json()}


def evaluate_keys(workdir: str, keys: Iterable[QualityKey], *, windows: int = 64,
                  window_len: int = 128, gate_steps: int = 60, cache: str | None = None,
                  progress: bool = True) -> dict[QualityKey, dict]:
    """Measured bits/char of every distinct key on the trained model in ``workdir``.

    Each key becomes a :class:`~ec2moe_jax.pipeline.plans.PipelinePlan` run by the real
    pipeline (end and cloud submeshes, the link codec and group gate of
    :func:`~ec2moe_jax.pipeline.runtime.prepare`) scoring ``windows`` held-out windows. A
    "group" key trains a gate for ``gate_steps`` when none is saved for its mask.

    Args:
      workdir: a trained run (``load_run`` reads it; routing statistics are cached there).
      keys: the keys to evaluate (duplicates are evaluated once).
      windows, window_len: the held-out text, see :func:`heldout_windows`.
      gate_steps: group-gate training steps for a mask without a saved gate; 0: the
        least-squares-initialised gate for every mask (saved gates ignored), the cheap and
        uniform setting.
      cache: results JSON (default ``<workdir>/bench_quality.json``), keyed by the label, the
        text, ``gate_steps`` and :func:`checkpoint_fingerprint`; cached keys cost nothing.
      progress: a tqdm bar over the keys.

    Returns:
      ``{key: {"bits_per_char", "gate", "codec_source",
      "routing_mass_covered_per_end_layer", "seconds", "plan"}}``.
    """
    from tqdm.auto import tqdm

    from ec2moe_jax.files import write_json_atomic

    keys = list(dict.fromkeys(keys))
    path = cache or os.path.join(workdir, "bench_quality.json")
    fingerprint = checkpoint_fingerprint(workdir)
    entries = _read_cache(path)
    ids = {k: _cache_id(k, windows, window_len, gate_steps, fingerprint) for k in keys}
    out = {k: entries[ids[k]]["result"] for k in keys if ids[k] in entries}
    todo = [k for k in keys if k not in out]
    if not todo:
        return out
    from ec2moe_jax.sharding import split_end_cloud
    from ec2moe_jax.training import load_run

    run = load_run(workdir)
    setup, splits = run[0], run[2]
    if window_len > setup.cfg.model.max_seq_len:
        raise ValueError(f"window_len={window_len} exceeds the model's max_seq_len="
                         f"{setup.cfg.model.max_seq_len}")
    texts = heldout_windows(splits.test, windows, window_len)
    meshes = split_end_cloud(setup.cfg.mesh)
    for key in tqdm(todo, desc="quality", disable=not progress):
        out[key] = _evaluate_one(run, meshes, key, texts, workdir=workdir,
                                 gate_steps=gate_steps)
        # Re-read before writing so concurrent or interrupted runs lose nothing measured.
        entries = _read_cache(path)
        entries[ids[key]] = {"key": key.to_json(), "result": out[key]}
        write_json_atomic(path, {"benchmark": "plan_quality", "entries": entries})
    return {k: out[k] for k in keys}
