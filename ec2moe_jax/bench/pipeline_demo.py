"""The end-cloud demo and its plan comparison: EC2MoE's scheduled plan against the baselines
(cloud-only, end-only, best single split), all run through the real pipeline on the end and
cloud submeshes of this machine with an emulated link.

Every figure is labelled: "measured" (stage compute on this CPU's fake devices, the link
emulated on the virtual clock) or "predicted" (the scheduler's cost model, calibrated on
this CPU). The end and the cloud are the same CPU here, so the end is not slower than the
cloud: the comparison shows link and compute trade-offs, not device heterogeneity.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from ec2moe_jax.pipeline import Channel, executor, runtime
from ec2moe_jax.pipeline.plans import PipelinePlan, instance, predicted_latency, scheduled_plans
from ec2moe_jax.profiles import LinkProfile
from ec2moe_jax.scheduler import codec_options, this_cpu


@dataclasses.dataclass
class Workload:
    prompts: np.ndarray  # [N, P]
    max_new_tokens: int
    texts: np.ndarray  # [N', T + 1] for scoring


def run_plan(model, params, plan: PipelinePlan, meshes, work: Workload, link: LinkProfile, *,
             freq, workdir, train_tokens, temperature=0.0, on_token=None,
             gate_steps: int = 0) -> dict:
    """Runs one plan on both workloads (after an untimed warm-up); returns measured
    summaries, bits/char of the scored text and the generated tokens. A plan that drops
    experts routes its end layers with the HL-GGN group gate when one is saved for its mask
    (``gate_steps > 0`` trains one first)."""
    stages, info = runtime.prepare(model, params, plan, *meshes, frequencies=freq,
                                   workdir=workdir, train_tokens=train_tokens,
                                   temperature=temperature, gate_steps=gate_steps)
    runtime.warm_up(stages, prompts=work.prompts, texts=work.texts,
                    micro_batch=plan.micro_batch, link=link)
    tokens, gen = executor.generate(stages, work.prompts, work.max_new_tokens,
                                    channel=Channel.from_profile(link),
                                    micro_batch=plan.micro_batch, on_token=on_token)
    lp, sc = executor.score(stages, work.texts, channel=Channel.from_profile(link),
                            micro_batch=plan.micro_batch)
    return {"plan": info, "generate": gen.summary(), "score": sc.summary(),
            "bits_per_char": float(-lp.mean() / np.log(2)), "tokens": tokens,
            "method": "measured stage compute on this CPU (fake devices: end 2, cloud 6), "
                      f"link emulated ({link.name}: {link.bandwidth_bps / 1e6:g} Mbit/s, "
                      f"RTT {link.rtt_s * 1e3:g} ms) on the virtual clock"}


def demo_workload(tok, splits, prompt: str, n: int = 4, prompt_len: int = 16,
                  max_new_tokens: int = 48, score_len: int = 128) -> Workload:
    """``prompt`` plus ``n - 1`` windows of held-out text as prompts (all ``prompt_len``
    bytes, left-padded with spaces), and ``2 n`` held-out windows to score."""
    first = tok.encode(prompt)[-prompt_len:]
    first = [32] * (prompt_len - len(first)) + list(first)
    test = np.asarray(splits.test)
    starts = np.linspace(0, len(test) - score_len - 2, 2 * n).astype(int)
    prompts = [first] + [test[s:s + prompt_len].tolist() for s in starts[1:n]]
    texts = np.stack([test[s:s + score_len + 1] for s in starts])
    return Workload(np.asarray(prompts, np.int32), max_new_tokens, texts.astype(np.int32))


def run_demo(workdir: str, link: LinkProfile, work: Workload, *, temperature: float,
             calibration: str | os.PathLike,
             pipeline_calibration: str | os.PathLike | None,
             codec_sweep: str | os.PathLike, on_token=None, on_plan=None,
             expert_fraction: float = 0.5) -> dict:
    """Schedules EC2MoE for this CPU as the end device, runs it and the baselines through
    the pipeline, and returns the JSON-ready comparison (tokens under ``"_tokens"``).

    Args:
      workdir: the trained run.
      on_plan: called as ``on_plan(name, plan JSON)`` before each plan runs.
      calibration, pipeline_calibration: this CPU's calibration files (``ec2moe calibrate``,
        ``ec2moe pipeline-calibration``, e.g. ``results/calibration_cpu.json`` and
        ``results/pipeline_calibration.json``; pipeline_calibration None: the single-device
        fit for both sides; see :func:`ec2moe_jax.scheduler.this_cpu`).
      codec_sweep: ``ec2moe codec-sweep``'s record, the codec options the scheduler may use.
      expert_fraction: share of the experts this CPU's memory budget holds as an end device.

    Raises:
      FileNotFoundError: a calibration or sweep file is missing (the message names the
        command that writes it).
    """
    from ec2moe_jax.sharding import split_end_cloud
    from ec2moe_jax.training import load_run

    setup, params, splits, freq = load_run(workdir)
    cfg = setup.cfg.model
    meshes = split_end_cloud(setup.cfg.mesh)
    end, cal, cloud_cal = this_cpu(cfg, calibration, pipeline_calibration,
                                   expert_fraction=expert_fraction)
    codecs = codec_options(cfg.d_model, codec_sweep)
    p, g, t = work.prompts.shape[1], work.max_new_tokens, work.texts.shape[1] - 1
    inst_gen = instance(cfg, freq, end, link, cal, prompt_tokens=p, gen_tokens=g,
                        cloud_cal=cloud_cal, codecs=codecs)
    inst_score = instance(cfg, freq, end, link, cal, prompt_tokens=t, gen_tokens=0,
                          cloud_cal=cloud_cal, codecs=codecs)
    rows, tokens, seen = [], {}, {}
    for name, (plan, sched) in scheduled_plans(cfg, inst_gen).items():
        if on_plan is not None:  # say what runs next: each plan compiles and runs for seconds
            on_plan(name, plan.to_json())
        # EC2MoE's own plan routes dropped-expert layers with the group gate; baselines use
        # plain masked top-k, so a gated plan is never reused for a baseline of equal shape.
        drops = not plan.allowed(freq, cfg)[: plan.split].all()
        gate_steps = 60 if name == "ec2moe" and drops else 0
        key = (plan.split, plan.resident, plan.codec, plan.micro_batch, plan.swap, gate_steps)
        if key in seen:  # the same plan under another name: reuse its measurement
            row = {**seen[key], "name": name, "same_as": seen[key]["name"]}
        else:
            cb = on_token if name == "ec2moe" else None
            row = run_plan(setup.model, params, plan, meshes, work, link, freq=freq,
                           workdir=workdir, train_tokens=splits.train,
                           temperature=temperature, on_token=cb, gate_steps=gate_steps)
            row = {"name": name, **row}
            tokens[name] = row.pop("tokens")
            seen[key] = row
        row["predicted_generate_s"] = predicted_latency(inst_gen, sched)
        row["predicted_score_s"] = predicted_latency(inst_score, sched)
        rows.append(row)
    return {"benchmark": "end_cloud_demo", "workdir": workdir, "link": dataclasses.asdict(link),
            "end_device": dataclasses.asdict(end), "calibration": dataclasses.asdict(cal),
            "cloud_calibration": dataclasses.asdict(cloud_cal),
            "workload": {"requests": len(work.prompts), "prompt_tokens": p,
                         "max_new_tokens": g, "scored_windows": len(work.texts),
                         "scored_tokens_per_window": t},
            "predicted_method": "scheduler cost model (one request, no queueing), calibrated "
                                "per submesh on this CPU; end and cloud both = this CPU",
            "rows": rows, "_tokens": tokens}
