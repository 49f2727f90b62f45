"""Quality against end memory: bits/char on held-out text as a function of the end device's
memory budget for expert weights, one line per method (measured on the machine at hand).

Shape legend: L layers, M MoE layers, E experts.

The end runs the first ``num_end_layers`` layers. Its budget for expert weights is a
fraction of those layers' routed experts stored in bfloat16 (10% .. 100%); the always-on
parts (attention, router, a shared expert) are fixed weights outside the budget, as in
:func:`~ec2moe_jax.selection.select_for_profile`. A method is a *variant*:

* the LM: ``plain`` (the main recipe) or ``residency`` (trained with
  ``train.residency_prob``, :mod:`ec2moe_jax.training.residency`);
* how the end stores experts: ``bf16``, ``int8`` or ``int4`` (weight-only,
  :mod:`ec2moe_jax.layers.quant`; quantised experts are smaller, so more fit), or
  ``mixed``: as many experts as fit in int2, the most-used upgraded to int4, then int8, with
  what is left (:func:`~ec2moe_jax.selection.mixed_precision`);
* how it routes among the resident ones: ``masked`` (the router restricted to them) or
  ``gate`` (the HL-GGN group gate, trained for that resident set with the LM frozen).

For each (variant, fraction) the budget buys ``floor(budget / expert bytes)`` experts,
handed out by routing mass (:func:`~ec2moe_jax.selection.select_experts`, at least
``min(top_k, slots / M)`` per end MoE layer); a budget that cannot give every end MoE layer
one expert is reported infeasible. Where every expert fits, ``gate`` equals ``masked`` (the
router is exact) and is not trained. Points are cached in the output file as they finish,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from ec2moe_jax.files import read_json, write_json_atomic
from ec2moe_jax.layers import QuantSpec, quantize_experts, quantize_experts_mixed
from ec2moe_jax.selection import mixed_precision, select_experts
from ec2moe_jax.training import gate as gate_lib
from ec2moe_jax.training.workdir import load_run

FRACTIONS = (0.10, 0.25, 0.50, 0.75, 1.00)
LMS = ("plain", "residency")
EXPERTS = ("bf16", "int8", "int4", "mixed")
MIXED = {"mixed": (2, 4, 8)}  # mixed formats: the ladder of bits, count first (selection)
ROUTERS = ("masked", "gate")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One method of the curve: ``lm`` x ``experts`` x ``router`` (see the module doc)."""

    lm: str
    experts: str
    router: str

    def __post_init__(self):
        for field, allowed in (("lm", LMS), ("experts", EXPERTS), ("router", ROUTERS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}={getattr(self, field)!r} must be one of {allowed}")

    @property
    def name(self) -> str:
        return f"{self.lm}/{self.experts}/{self.router}"

    @classmethod
    def parse(cls, name: str) -> Variant:
        parts = name.split("/")
        if len(parts) != 3:
            raise ValueError(f"variant {name!r}: write lm/experts/router, e.g. plain/int4/gate")
        return cls(*parts)


# The four lines (masked top-k, group gate, residency-trained LM + gate, quantised
# experts + gate), int8 too, then quantised experts on the plain LM and with the bare router
# (cheap: no gate to train), which is what a plan that drops one or two experts may prefer,
# and the mixed-precision ladder on both LMs.
DEFAULT_VARIANTS = tuple(Variant.parse(n) for n in (
    "plain/bf16/masked", "plain/bf16/gate", "residency/bf16/gate", "residency/int4/gate",
    "residency/int8/gate", "plain/int4/gate", "plain/int4/masked", "residency/int4/masked",
    "residency/bf16/masked", "plain/mixed/gate", "residency/mixed/gate"))


def budget_slots(cfg, fraction: float, experts: QuantSpec, num_end_layers: int) -> int:
    """Experts of the end layers that fit ``fraction`` of their bf16 expert bytes when
    stored as ``experts`` (exact stored bytes, scales included)."""
    m_end = sum(cfg.is_moe_layer(i) for i in range(num_end_layers))
    d, f = cfg.d_model, cfg.moe.expert_dim
    total = m_end * cfg.moe.num_experts
    bf16, each = QuantSpec().expert_bytes(d, f), experts.expert_bytes(d, f)
    return min(int(fraction * total * bf16 / each + 1e-9), total)


def resident_mask(cfg, frequencies: np.ndarray, slots: int, num_end_layers: int
                  ) -> np.ndarray | None:
    """<bool>[L, E] resident experts for ``slots`` (all in cloud layers), or None when some
    end MoE layer would get none."""
    moe_rows = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    end_rows = [i for i in moe_rows if i < num_end_layers]
    if slots < len(end_rows):
        return None
    min_k = max(1, min(cfg.moe.top_k, slots // len(end_rows)))
    sub = np.asarray(select_experts(frequencies[:len(end_rows)], slots, min_k))
    allowed = np.ones((cfg.num_layers, cfg.moe.num_experts), bool)
    allowed[end_rows] = sub
    return allowed


def end_layout(cfg, frequencies: np.ndarray, fraction: float, experts: str,
               num_end_layers: int) -> tuple[np.ndarray | None, np.ndarray, float]:
    """What the end stores for a budget of ``fraction`` of its layers' bf16 expert bytes:
    ``(allowed <bool>[L, E] or None if some end MoE layer gets no expert, bits <int>[L, E]
    (0: not stored; 16 in cloud layers), exact stored expert bytes)``."""
    e = cfg.moe.num_experts
    end_rows = [i for i in range(num_end_layers) if cfg.is_moe_layer(i)]
    bits = np.full((cfg.num_layers, e), 16, np.int64)
    if experts in MIXED:
        d, f = cfg.d_model, cfg.moe.expert_dim
        sizes = {b: QuantSpec(b).expert_bytes(d, f) for b in MIXED[experts]}
        budget = fraction * len(end_rows) * e * QuantSpec().expert_bytes(d, f)
        sub = mixed_precision(frequencies[:len(end_rows)], budget, sizes,
                              min_per_layer=cfg.moe.top_k)
        bits[end_rows] = sub
        allowed = np.ones_like(bits, bool)
        allowed[end_rows] = sub > 0
        stored = float(sum(sizes[b] for b in sub.reshape(-1) if b))
        return (None if not allowed[end_rows].any(-1).all() else allowed), bits, stored
    spec = QuantSpec.parse(experts)
    slots = budget_slots(cfg, fraction, spec, num_end_layers)
    allowed = resident_mask(cfg, frequencies, slots, num_end_layers)
    if allowed is not None:
        bits[end_rows] = np.where(allowed[end_rows], spec.bits, 0)
    return allowed, bits, float(slots * spec.expert_bytes(cfg.d_model, cfg.moe.expert_dim))


def _evaluate(run, allowed, bits, variant: Variant, num_end_layers, gate_steps, eval_batches,
              progress) -> dict:
    setup, params, splits, freq = run
    model = setup.model
    end_rows = [i for i in range(num_end_layers) if setup.cfg.model.is_moe_layer(i)]
    if variant.experts in MIXED:
        params = quantize_experts_mixed(params, {i: bits[i] for i in end_rows})
    elif QuantSpec.parse(variant.experts).bits < 16:
        params = quantize_experts(params, QuantSpec.parse(variant.experts),
                                  range(num_end_layers))
    eval_kw = {"max_batches": eval_batches}
    gspec, gates = gate_lib.init_gates(model, params, (allowed, num_end_layers), freq,
                                       splits.train)
    t0, history = time.perf_counter(), []
    if variant.router == "gate" and not allowed.all():
        gates, history = gate_lib.train_gates(model, params, gspec, gates, splits.train,
                                              steps=gate_steps, progress=progress)
        out = gate_lib.evaluate_split(model, params, gspec, gates, splits.test, "gate",
                                      **eval_kw)
    else:
        out = gate_lib.evaluate_split(model, params, gspec, None, splits.test, "masked",
                                      **eval_kw)
    out["gate_train_seconds"] = time.perf_counter() - t0 if history else 0.0
    return out


def _full(run, num_end_layers, eval_batches) -> float:
    setup, params, splits, freq = run
    cfg = setup.cfg.model
    allowed = np.ones((cfg.num_layers, cfg.moe.num_experts), bool)
    gspec, _ = gate_lib.init_gates(setup.model, params, (allowed, num_end_layers), freq,
                                   splits.train, batches=1)
    return gate_lib.evaluate_split(setup.model, params, gspec, None, splits.test, "full",
                                   max_batches=eval_batches)["bits_per_char"]


def run_model(name: str, workdirs: dict[str, str], out: str, *, variants=DEFAULT_VARIANTS,
              fractions=FRACTIONS, num_end_layers: int = 2, gate_steps: int = 100,
              eval_batches: int = 60, progress: bool = True) -> dict:
    """Measures one model's curve and merges it into ``out`` (point by point).

    Args:
      name: the model's key in the result (e.g. "small").
      workdirs: ``{"plain": workdir, "residency": workdir}``; a missing LM's variants are
        skipped (and listed under ``skipped``).
      out: the JSON file (read first: points it already holds for the same settings are
        not measured again).

    Returns:
      The model's entry: ``full`` bits/char per LM, ``points`` (one per variant and
      fraction) and the settings.
    """
    from ec2moe_jax.bench.quality import checkpoint_fingerprint

    record = read_json(out, what="quality-memory results") if os.path.exists(out) else {}
    settings = {"num_end_layers": num_end_layers, "gate_steps": gate_steps,
                "eval_batches": eval_batches}
    present = {lm: wd for lm, wd in workdirs.items()
               if wd and os.path.isdir(os.path.expanduser(wd))}
    prints = {lm: checkpoint_fingerprint(wd) for lm, wd in present.items()}
    entry = record.get("models", {}).get(name, {})
    # Points of another checkpoint (retrained in the same workdir) are measured again;
    # entries from before fingerprints were recorded are kept.
    stale = any(entry.get("fingerprints", {}).get(lm, fp) != fp for lm, fp in prints.items())
    if entry.get("settings") != settings or entry.get("workdirs") != workdirs or stale:
        entry = {"settings": settings, "workdirs": workdirs, "full": {}, "points": []}
    entry["fingerprints"] = {**entry.get("fingerprints", {}), **prints}
    done = {(p["variant"], p["fraction"]) for p in entry["points"]}
    runs, skipped = {}, []
    for lm, wd in present.items():
        runs[lm] = load_run(wd, progress=progress)
    if "plain" not in runs and progress:
        print(f"{name}: no plain workdir; relative increases are over the {list(runs)} LM's "
              "own full model", flush=True)
    if not runs:
        raise FileNotFoundError(f"{name}: none of the workdirs {workdirs} exists")
    cfg = next(iter(runs.values()))[0].cfg.model
    m_end = sum(cfg.is_moe_layer(i) for i in range(num_end_layers))
    if not 1 <= num_end_layers < cfg.num_layers or m_end == 0:
        raise ValueError(f"num_end_layers={num_end_layers}: the end must run at least one MoE "
                         f"layer and leave the cloud one of the model's {cfg.num_layers}")
    for lm, run in runs.items():
        if lm not in entry["full"]:
            entry["full"][lm] = _full(run, num_end_layers, eval_batches)
    entry["config"] = {"num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k,
                       "expert_dim": cfg.moe.expert_dim,
                       "shared_expert_dim": cfg.moe.shared_expert_dim, "end_moe_layers": m_end}
    for v in variants:
        if v.lm not in runs:
            skipped.append(v.name)
            continue
        run = runs[v.lm]
        for f in fractions:
            if (v.name, f) in done:
                continue
            allowed, bits, stored_bytes = end_layout(cfg, run[3], f, v.experts, num_end_layers)
            end_bits = bits[[i for i in range(num_end_layers) if cfg.is_moe_layer(i)]]
            slots = int((end_bits > 0).sum()) if allowed is not None else int(
                budget_slots(cfg, f, QuantSpec.parse(v.experts), num_end_layers)
                if v.experts not in MIXED else 0)
            point = {"variant": v.name, "lm": v.lm, "experts": v.experts, "router": v.router,
                     "fraction": f, "slots": slots,
                     "resident_fraction": slots / (m_end * cfg.moe.num_experts)}
            if allowed is None:
                point.update(feasible=False, reason=f"{slots} {v.experts} experts cannot give "
                             f"each of the {num_end_layers} end layers one")
            else:
                res = _evaluate(run, allowed, bits, v, num_end_layers, gate_steps,
                                eval_batches, progress)
                point.update(
                    feasible=True,
                    resident_per_layer=allowed[:num_end_layers].sum(-1).tolist(),
                    experts_by_bits={str(b): int((end_bits == b).sum())
                                     for b in sorted(set(end_bits.reshape(-1).tolist()) - {0})},
                    expert_bytes=stored_bytes,
                    bits_per_char=res["bits_per_char"],
                    relative_increase=res["bits_per_char"] / entry["full"]["plain" if "plain"
                                                                            in runs else v.lm]
                    - 1.0,
                    covered_mass=res["covered_mass"], recall_at_k=res["recall_at_k"],
                    gate_train_seconds=res["gate_train_seconds"])
            entry["points"].append(point)
            _save(out, name, entry)
            if progress:
                print(f"{name} {v.name:>24} @ {f:.2f}: "
                      + (f"{point['bits_per_char']:.4f} bits/char ({slots} experts)"
                         if point["feasible"] else "infeasible"), flush=True)
    entry["skipped"] = skipped
    if skipped and progress:
        missing = sorted({v.split("/")[0] for v in skipped})
        print(f"{name}: skipped {len(skipped)} methods: no workdir for the {missing} LM "
              f"({ {lm: workdirs.get(lm) for lm in missing} })", flush=True)
    _save(out, name, entry)
    return entry


def _save(out: str, name: str, entry: dict) -> None:
    """Writes ``entry`` as model ``name`` of ``out``, re-reading the file first so a run of
    another model into the same file loses nothing (atomic replace)."""
    record = read_json(out, what="quality-memory results") if os.path.exists(out) else {}
    record.setdefault("models", {})[name] = entry
    write_json_atomic(out, record)


def best_by_fraction(entry: dict) -> dict[float, dict]:
    """The lowest bits/char point of each fraction (over every feasible variant)."""
    best: dict[float, dict] = {}
    for p in entry["points"]:
        if p["feasible"] and (p["fraction"] not in best
                              or p["bits_per_char"] < best[p["fraction"]]["bits_per_char"]):
            best[p["fraction"]] = p
    return dict(sorted(best.items()))


def finish(record: dict) -> dict:
    """Completes a record: every feasible point's ``resident_fraction`` (points written
    before it was recorded get it from their slots), ``best`` per model and budget, and
    ``quality_table``: per model and method, the loss the scheduler is charged at each
    resident fraction (:class:`~ec2moe_jax.scheduler.ResidencyQuality`)."""
    from ec2moe_jax.scheduler import ResidencyQuality

    record["best"], record["quality_table"] = {}, []
    for name, entry in record.get("models", {}).items():
        c = entry["config"]
        per_end = c.get("end_moe_layers", entry["settings"]["num_end_layers"]) * c["num_experts"]
        for p in entry["points"]:
            p.setdefault("resident_fraction", p["slots"] / per_end)
        record["best"][name] = {
            str(f): {k: p[k] for k in ("variant", "bits_per_char", "relative_increase", "slots")}
            for f, p in best_by_fraction(entry).items()}
        uniform = {p["variant"] for p in entry["points"]
                   if p["feasible"] and p["experts"] not in MIXED}  # the scheduler's formats
        for variant in sorted(uniform):
            q = ResidencyQuality.from_quality_memory(record, name, variant)
            record["quality_table"].append({"model": name, "variant": variant,
                                            "resident_fraction": list(q.fractions),
                                            "charged_loss": list(q.loss)})
    return record
