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
import json
import os

import numpy as np

from ec2moe_jax.models.costs import model_costs
from ec2moe_jax.pipeline import Channel, executor, runtime
from ec2moe_jax.pipeline.plans import PipelinePlan, from_scheduler
from ec2moe_jax.profiles import DeviceProfile, LinkProfile
from ec2moe_jax.scheduler import Calibration, build_instance, codec_options, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CALIBRATION = os.path.join(ROOT, "results", "calibration_cpu.json")


PIPELINE_CALIBRATION = os.path.join(ROOT, "results", "pipeline_calibration.json")


def _calibration(fit: dict, source: str) -> Calibration:
    return Calibration(fit["eta_flops"], fit["eta_bw"], fit["overhead_s"], source,
                       fit.get("layer_overhead_s", 0.0))


def this_cpu(cfg, expert_fraction: float = 0.5
             ) -> tuple[DeviceProfile, Calibration, Calibration]:
    """This CPU as the end and the cloud device: the profile measured by
    ``infer/calibrate.py``, memory for the fixed weights plus ``expert_fraction`` of the
    experts (what an app may get on a phone), and the end's and the cloud's calibrations.

    The calibrations are the per-submesh refits of ``results/pipeline_calibration.json``
    (end: 2 fake devices; cloud: 6, experts sharded) when present, else the single-device
    fit of ``results/calibration_cpu.json`` *unclamped* for both (we model this very
    machine, where caches beat the copy bandwidth)."""
    with open(CALIBRATION) as f:
        cal = json.load(f)
    prof = cal["profile"]
    costs = model_costs(cfg)
    mem = (costs.embed_bytes + costs.head_bytes + costs.fixed_bytes.sum()
           + expert_fraction * costs.is_moe.sum() * costs.num_experts * costs.expert_bytes
           + 4e6)  # activations and KV cache headroom
    device = DeviceProfile("this-cpu", memory_bytes=float(mem), peak_flops=prof["peak_flops"],
                           mem_bandwidth=prof["mem_bandwidth"],
                           source=f"measured ({prof['source']}); memory budget: fixed weights "
                                  f"+ {expert_fraction:.0%} of the experts")
    if os.path.exists(PIPELINE_CALIBRATION):
        with open(PIPELINE_CALIBRATION) as f:
            fits = json.load(f)["calibrations"]
        src = "per-submesh refit (results/pipeline_calibration.json)"
        return (device, _calibration(fits["refit_end"], f"end {src}"),
                _calibration(fits["refit_cloud"], f"cloud {src}"))
    single = _calibration(cal["fit"], "fitted on this CPU (results/calibration_cpu.json), "
                                      "unclamped")
    return device, single, single


def instance(cfg, freq, end: DeviceProfile, link: LinkProfile, cal: Calibration, *,
             prompt_tokens: int, gen_tokens: int, rate: float = 0.05,
             cloud_cal: Calibration | None = None):
    """A one-device scheduling instance; the low rate makes queueing negligible, so the
    predicted latency is one request's (what the executor measures)."""
    return build_instance(model_costs(cfg), freq, [end], end, [link], [rate],
                          prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, calibration=cal,
                          cloud_calibration=cloud_cal)


def scheduled_plans(cfg, inst) -> dict[str, tuple[PipelinePlan, object]]:
    """EC2MoE's plan and the scheduler's baselines, as (pipeline plan, scheduler plan)."""
    from ec2moe_jax.scheduler.plan import baseline_plans, schedule_checked

    names = [c.name for c in codec_options(cfg.d_model)]
    plan, _ = schedule_checked(inst)
    out = {"ec2moe": (from_scheduler(plan, inst, cfg, "ec2moe", codec_names=names), plan)}
    for key, p in baseline_plans(inst).items():
        name = key.replace("_", "-")
        out[name] = (from_scheduler(p, inst, cfg, name, codec_names=names), p)
    return out


def predicted_latency(inst, plan) -> float:
    return float(evaluate(inst, plan)["mean_latency_s"])


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


def plot(rows: list[dict], path: str) -> str | None:
    """Bars of measured generation latency, TTFT and scoring latency per plan (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r["name"] for r in rows]
    series = {"generation latency (s)": [r["generate"]["latency_p50_s"] for r in rows],
              "time to first token (s)": [r["generate"]["ttft_mean_s"] for r in rows],
              "scoring latency (s)": [r["score"]["latency_p50_s"] for r in rows],
              "predicted generation latency (s)": [r.get("predicted_generate_s") or 0
                                                   for r in rows]}
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=120)
    width = 0.8 / len(series)
    for j, (label, vals) in enumerate(series.items()):
        ax.bar(np.arange(len(names)) + j * width, vals, width, label=label)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    ax.set_ylabel("seconds (p50 over requests)")
    ax.set_title("EC2MoE vs baselines: measured compute (this CPU) + emulated link")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
             on_token=None, expert_fraction: float = 0.5) -> dict:
    """Schedules EC2MoE for this CPU as the end device, runs it and the baselines through
    the pipeline, and returns the JSON-ready comparison (tokens under ``"_tokens"``)."""
    from ec2moe_jax.bench.hlggn import load_run
    from ec2moe_jax.sharding import split_end_cloud

    setup, params, splits, freq = load_run(workdir)
    cfg = setup.cfg.model
    meshes = split_end_cloud(setup.cfg.mesh)
    end, cal, cloud_cal = this_cpu(cfg, expert_fraction)
    p, g, t = work.prompts.shape[1], work.max_new_tokens, work.texts.shape[1] - 1
    inst_gen = instance(cfg, freq, end, link, cal, prompt_tokens=p, gen_tokens=g,
                        cloud_cal=cloud_cal)
    inst_score = instance(cfg, freq, end, link, cal, prompt_tokens=t, gen_tokens=0,
                          cloud_cal=cloud_cal)
    rows, tokens, seen = [], {}, {}
    for name, (plan, sched) in scheduled_plans(cfg, inst_gen).items():
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
