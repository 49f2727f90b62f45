"""The pipeline side of ``infer/main.py``: resolve ``--plan`` and run scoring or generation
through the end-cloud pipeline, printing latency, TTFT, TPOT, bytes and throughput."""

from __future__ import annotations

import json
import os

import numpy as np

from ec2moe_jax.pipeline import Channel, executor, runtime
from ec2moe_jax.pipeline.plans import BASELINES, PipelinePlan, baseline, load_plan


def resolve_plan(name: str, cfg, freq, link, end_device: str, *, prompt_tokens: int,
                 gen_tokens: int) -> PipelinePlan:
    """A plan JSON path, a baseline name, or "ec2moe" (the scheduler's plan for
    ``end_device``: "this-cpu" or a preset name, over ``link``)."""
    if os.path.exists(name):
        return load_plan(name, cfg)
    if name not in BASELINES + ("ec2moe",):
        raise ValueError(f"--plan {name!r} is neither a file nor one of "
                         f"{list(BASELINES) + ['ec2moe']}")
    from ec2moe_jax.bench import pipeline_demo as demo
    from ec2moe_jax.profiles import device

    dev, cal, cloud_cal = demo.this_cpu(cfg)
    if end_device != "this-cpu":
        dev = device(end_device)
    inst = demo.instance(cfg, freq, dev, link, cal, prompt_tokens=prompt_tokens,
                         gen_tokens=gen_tokens, cloud_cal=cloud_cal)
    if name == "ec2moe":
        return demo.scheduled_plans(cfg, inst)["ec2moe"][0]
    return baseline(name, cfg, inst)


def run(cmd: str, workdir: str, tokens: np.ndarray, plan_name: str, link, end_device: str,
        *, max_new_tokens: int = 0, temperature: float = 0.0, on_token=None) -> dict:
    """Runs ``cmd`` ("score": ``tokens`` [N, T + 1]; "generate": prompts [N, P])."""
    from ec2moe_jax.bench.hlggn import load_run
    from ec2moe_jax.sharding import split_end_cloud

    setup, params, splits, freq = load_run(workdir)
    cfg = setup.cfg.model
    gen = max_new_tokens if cmd == "generate" else 0
    plen = tokens.shape[1] - (cmd == "score")
    plan = resolve_plan(plan_name, cfg, freq, link, end_device, prompt_tokens=plen,
                        gen_tokens=gen)
    stages, info = runtime.prepare(setup.model, params, plan, *split_end_cloud(setup.cfg.mesh),
                                   frequencies=freq, workdir=workdir,
                                   train_tokens=splits.train, temperature=temperature)
    kw = {"micro_batch": plan.micro_batch}
    if cmd == "generate":
        runtime.warm_up(stages, prompts=tokens, link=link, **kw)
        out, rep = executor.generate(stages, tokens, max_new_tokens,
                                     channel=Channel.from_profile(link), on_token=on_token, **kw)
    else:
        runtime.warm_up(stages, texts=tokens, link=link, **kw)
        lp, rep = executor.score(stages, tokens, channel=Channel.from_profile(link), **kw)
        out = lp
    record = {"plan": info, "link": link.name, "summary": rep.summary(),
              "requests": [r.__dict__ for r in rep.requests],
              "method": "measured stage compute (this CPU, fake devices) + emulated link"}
    if cmd == "score":
        record["bits_per_char"] = float(-np.mean(out) / np.log(2))
    print(json.dumps(record["summary"], indent=1))
    return record | {"output": out}
