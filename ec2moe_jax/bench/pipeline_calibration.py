"""Measured pipeline stage and end-to-end times on this machine vs the scheduler's cost model.

For single-request runs of several plans (splits 0..L, every expert resident, bf16 hidden
state, micro-batch 1) the executor measures each stage's compute (block_until_ready) and
composes the end-to-end latency with the emulated link. The cost model's own work
accounting (FLOPs, bytes and layers of each stage job, :func:`ec2moe_jax.scheduler.model.
stage_work`) and its stage time (:func:`~ec2moe_jax.scheduler.model.stage_time`, ``overhead
+ layers * layer_overhead + FLOPs / (eta_f F) + bytes / (eta_b BW)``) then predict them with
two calibrations: (a) ``results/calibration_cpu.json``, fitted on single-device stage
timings (what the scheduler uses by default, efficiencies unclamped), and (b) a refit of the
four coefficients per submesh (the end's 2 devices, the cloud's 6 with experts sharded: a
calibration is per device) on the pipeline's own stages at the *fit* splits
(:func:`~ec2moe_jax.scheduler.calibrate.fit_stage_model`), validated on the other splits and
on every end-to-end latency (the end-to-end figures are never fitted).
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np

from ec2moe_jax.files import read_json
from ec2moe_jax.pipeline import Channel, executor, runtime
from ec2moe_jax.pipeline.plans import PipelinePlan, instance
from ec2moe_jax.profiles import LinkProfile
from ec2moe_jax.scheduler import Calibration, Plan, evaluate, predict, this_cpu
from ec2moe_jax.scheduler.calibrate import CALIBRATE_COMMAND, fit_stage_model
from ec2moe_jax.scheduler.model import stage_work

STAGE_NAMES = {"score": ("end", "cloud"), "prefill": ("end_prefill", "cloud_prefill"),
               "step": ("end_step", "cloud_step")}


def _sched_plan(split: int, num_layers: int, num_experts: int) -> Plan:
    res = [num_experts if i < split else 0 for i in range(num_layers)]
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return Plan(split=i32([split]), resident=i32([res]), swap=jnp.zeros(1, bool),
                codec=i32([0]), batch=i32([0]))


def fit_side(rows, F: float, BW: float, source: str) -> Calibration:
    """The stage-time coefficients fitted on ``rows`` (relative least squares)."""
    col = lambda k: np.array([r[k] for r in rows], np.float64)  # noqa: E731
    return Calibration.from_fit(fit_stage_model(col("flops"), col("bytes"), col("layers"),
                                                col("measured_s"), F, BW), source)


def measure_plan(model, params, split, meshes, link, *, freq, prompt, texts, gen_tokens,
                 repeats: int) -> dict:
    """Median stage times and single-request latencies of one split (measured)."""
    cfg = model.cfg
    plan = PipelinePlan(f"split{split}", split, (cfg.moe.num_experts,) * cfg.num_layers)
    stages, _ = runtime.prepare(model, params, plan, *meshes, frequencies=freq)
    runtime.warm_up(stages, prompts=prompt, texts=texts[:1], link=link)
    secs: dict[str, list] = {}
    lat = {"score": [], "generate": []}
    for r in range(repeats):
        _, rep = executor.score(stages, texts[r % len(texts)][None],
                                channel=Channel.from_profile(link))
        lat["score"].append(rep.requests[0].latency_s)
        for k, v in rep.stage_seconds.items():
            secs.setdefault(k, []).extend(v)
        _, rep = executor.generate(stages, prompt, gen_tokens, channel=Channel.from_profile(link))
        lat["generate"].append(rep.requests[0].latency_s)
        for k, v in rep.stage_seconds.items():
            secs.setdefault(k, []).extend(v)
    return {"stage_s": {k: float(np.median(v)) for k, v in secs.items()},
            "latency_s": {k: float(np.median(v)) for k, v in lat.items()}}


def _stage_rows(inst_by_kind, meas, split, L, E, P, G, T) -> list[dict]:
    plan = _sched_plan(split, L, E)
    jobs = {"score": (inst_by_kind["score"], T, T / 2), "prefill": (inst_by_kind["gen"], P, P / 2),
            "step": (inst_by_kind["gen"], 1, P + G / 2)}
    rows = []
    for kind, (inst, tokens, ctx) in jobs.items():
        work = {k: float(v[0]) for k, v in stage_work(inst, plan, tokens, ctx).items()}
        for side, name in zip(("end", "cloud"), STAGE_NAMES[kind], strict=True):
            if name not in meas["stage_s"]:
                continue
            t = meas["stage_s"][name] + (meas["stage_s"].get("hop", 0.0) if side == "cloud"
                                         else 0.0)
            rows.append({"split": split, "side": side, "job": kind, "tokens": tokens,
                         "measured_s": t, "flops": work[f"{side}_flops"],
                         "bytes": work[f"{side}_bytes"], "layers": work[f"{side}_layers"]})
    return rows


def calibrate(model, params, meshes, link: LinkProfile, *, freq, prompt, texts,
              calibration: str | os.PathLike, gen_tokens=32, fit_splits=(1, 3),
              repeats=3) -> dict:
    """The calibration record (see the module docstring); ``prompt`` [1, P], ``texts``
    [R, T + 1]; ``calibration``: ``ec2moe calibrate``'s file (``results/calibration_cpu.json``),
    this CPU's profile and the single-device fit the refits are compared with.

    Raises:
      FileNotFoundError: ``calibration`` is missing (the message names ``ec2moe calibrate``).
    """
    cfg = model.cfg
    L, E = cfg.num_layers, cfg.moe.num_experts
    P, T = prompt.shape[1], texts.shape[1] - 1
    dev, _, _ = this_cpu(cfg, calibration, expert_fraction=1.0)
    fit0 = read_json(calibration, what="the CPU calibration", command=CALIBRATE_COMMAND)["fit"]
    # The single-device fit, unclamped: the reference to beat.
    cal0 = Calibration.from_fit(fit0, f"fitted on this CPU ({os.fspath(calibration)}), "
                                "unclamped")
    F, BW = dev.available_flops, dev.available_bandwidth

    def insts(end_cal, cloud_cal):
        # The plans here send the bf16 hidden state only: no codec options needed.
        mk = lambda p, g: instance(cfg, freq, dev, link, end_cal, prompt_tokens=p,  # noqa: E731
                                   gen_tokens=g, codecs=None, cloud_cal=cloud_cal)
        return {"score": mk(T, 0), "gen": mk(P, gen_tokens)}

    base = insts(cal0, cal0)
    measured, rows = {}, []
    for s in range(L + 1):
        measured[s] = measure_plan(model, params, s, meshes, link, freq=freq, prompt=prompt,
                                   texts=texts, gen_tokens=gen_tokens, repeats=repeats)
        rows += _stage_rows(base, measured[s], s, L, E, P, gen_tokens, T)
    fits = {}
    for side in ("end", "cloud"):
        fit_rows = [r for r in rows if r["side"] == side and r["split"] in fit_splits]
        fits[side] = fit_side(fit_rows, F, BW, f"refit on the {side} submesh's pipeline "
                              f"stages at splits {list(fit_splits)} (measured on this CPU)")
    refit = insts(fits["end"], fits["cloud"])
    for r in rows:
        r["predicted_cpu_calibration_s"] = float(predict([r], F, BW, cal0)[0])
        r["predicted_refit_s"] = float(predict([r], F, BW, fits[r["side"]])[0])
        r["role"] = "fit" if r["split"] in fit_splits else "validate"
    e2e = []
    for s, m in measured.items():
        plan = _sched_plan(s, L, E)
        for kind, key in (("score", "score"), ("generate", "gen")):
            e2e.append({"split": s, "workload": kind, "measured_s": m["latency_s"][kind],
                        "predicted_cpu_calibration_s": float(
                            evaluate(base[key], plan)["mean_latency_s"]),
                        "predicted_refit_s": float(evaluate(refit[key], plan)["mean_latency_s"])})
    return _record(rows, e2e, fits, cal0, dev, link, P, T, gen_tokens, repeats)


def _errors(items, key) -> dict:
    e = np.array([abs(r[key] / r["measured_s"] - 1) for r in items])
    return {"median_rel_error": float(np.median(e)), "max_rel_error": float(e.max()),
            "within_25pct": int((e <= 0.25).sum()), "count": int(e.size)}


def _record(rows, e2e, fits, cal0, dev, link, P, T, G, repeats) -> dict:
    val = [r for r in rows if r["role"] == "validate"]
    fit = [r for r in rows if r["role"] == "fit"]
    summary = {}
    for key in ("predicted_cpu_calibration_s", "predicted_refit_s"):
        summary[key] = {"stages_validate": _errors(val, key), "stages_fit": _errors(fit, key),
                        "stages_all": _errors(rows, key), "end_to_end": _errors(e2e, key)}
        for side in ("end", "cloud"):
            summary[key][f"stages_validate_{side}"] = _errors(
                [r for r in val if r["side"] == side], key)
    return {"benchmark": "pipeline_calibration",
            "method": "measured on this CPU (2 cores shared, 8 fake devices: end 2, cloud 6), "
                      f"single requests, medians of {repeats} runs; link emulated "
                      f"({link.name}); predictions by the scheduler's cost model",
            "workload": {"score_tokens": T, "prompt_tokens": P, "gen_tokens": G},
            "stage_model": "seconds = overhead + layers * layer_overhead + FLOPs / (eta_flops "
                           "* F) + bytes / (eta_bw * BW) (ec2moe_jax.scheduler.model."
                           "stage_time); F, BW = this CPU's measured profile; FLOPs, bytes, "
                           "layers from the cost model (scheduler.model.stage_work)",
            "calibration_used": "predicted_refit_s: one calibration per submesh (end: 2 fake "
                                "devices; cloud: 6, experts sharded, the end->cloud hop "
                                "included), fitted on the stages at the fit splits only; the "
                                "validate stages (other splits) and every end-to-end latency "
                                "are held out. predicted_cpu_calibration_s: the single-device "
                                "fit of results/calibration_cpu.json, for comparison",
            "device_profile": dataclasses.asdict(dev),
            "calibrations": {"cpu": dataclasses.asdict(cal0),
                             "refit_end": dataclasses.asdict(fits["end"]),
                             "refit_cloud": dataclasses.asdict(fits["cloud"])},
            "summary": summary, "stages": rows, "end_to_end": e2e}
