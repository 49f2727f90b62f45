"""``ec2moe calibrate`` (the scheduler's roofline on this CPU) and ``ec2moe
pipeline-calibration`` (the pipeline's measured stage times vs the cost model)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from ec2moe_jax.cli import _common

_CALIBRATE = """\
Calibrate the scheduler's stage-time model on this machine: profile peak FLOP/s and copy
bandwidth, time every stage of the model (random weights; timings do not depend on them)
at several token counts, and fit seconds = overhead + layers x layer_overhead + FLOPs /
(eta_flops F) + bytes / (eta_bw BW), validated on held-out stage sizes. Writes <out>
(results/calibration_cpu.json). About half a minute on a 2-core CPU."""

_PIPELINE = """\
Measured per-stage and end-to-end times of the end-cloud pipeline on this machine (8 fake
CPU devices: end 2, cloud 6; link emulated) against the scheduler's cost model: refits the
stage model per submesh on splits 1 and 3 and validates it on the other splits. Uses the
trained model in --workdir if it holds a finished run (its routing statistics), else the
small config with random parameters and uniform routing (timings do not depend on the
weights). Writes <out> (results/pipeline_calibration.json). A few minutes on a 2-core
CPU."""


def register(sub) -> None:
    c = _common.add_parser(sub, "calibrate", help="calibrate the scheduler's cost model here",
                           description=_CALIBRATE)
    _common.add_config_args(c)
    c.add_argument("--tokens", default="1,16,64,256",
                   help="comma-separated token counts per timed stage call")
    c.add_argument("--repeats", type=int, default=15, help="timings per stage (median)")
    c.add_argument("--out", default=os.path.join(_common.RESULTS, "calibration_cpu.json"),
                   help="JSON path")
    c.set_defaults(handler=calibrate)

    p = _common.add_parser(sub, "pipeline-calibration",
                           help="pipeline stage times vs the cost model (measured)",
                           description=_PIPELINE, devices=True)
    p.add_argument("--workdir", default="runs/small",
                   help="trained model (if it holds a finished run; else random parameters)")
    p.add_argument("--link", default="lte",
                   help="emulated link preset: 3g, lte (20 Mbit/s, 50 ms RTT), wifi, 5g")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--calibration", default=_common.CALIBRATION,
                   help="this CPU's single-device calibration (`ec2moe calibrate` writes it)")
    p.add_argument("--out", default=os.path.join(_common.RESULTS, "pipeline_calibration.json"),
                   help="JSON path")
    p.set_defaults(handler=pipeline_calibration)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        out = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be comma-separated integers") from None
    if not out or min(out) < 1:
        raise ValueError(f"{flag} {text!r} must hold positive integers")
    return out


def calibrate(args: argparse.Namespace) -> dict:
    import jax

    from ec2moe_jax.profiles import measure
    from ec2moe_jax.scheduler.calibrate import fit, time_stages

    tokens = _ints(args.tokens, "--tokens")
    cfg = _common.build_config(args)
    start = time.time()
    load_before = os.getloadavg()
    _common.status("profiling this CPU (matmul and copy probes)")
    profile = measure()
    _common.status(f"timing every stage of {cfg.name} at {len(tokens)} token counts "
                   f"({args.repeats} repeats each)")
    rows = time_stages(cfg.model, tokens, args.repeats)
    record = {
        "benchmark": "scheduler_calibration",
        "method": f"measured on this CPU ({platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores, jax {jax.__version__}); the CPU is shared with "
                  "another engineer's niced jobs, so every timing is the median of repeats "
                  "(round-robin over stages) after two warm-up calls",
        "model": cfg.name,
        "stage_model": "seconds = overhead + layers * layer_overhead + FLOPs / (eta_flops * F)"
                       " + weight bytes / (eta_bw * BW) (ec2moe_jax.scheduler.model."
                       "stage_time); F, BW = this machine's live profile; fitted by least "
                       "squares on relative error (coefficients >= 0, efficiencies <= 10)",
        "holdout": "validation rows never enter the fit: the first half of the stack (a stage "
                   "size the fit never saw) at every token count, and every stage at 64 tokens",
        "profile": {"peak_flops": profile.peak_flops, "mem_bandwidth": profile.mem_bandwidth,
                    "load": profile.load, "source": profile.source},
        "fit": fit(rows, profile),
        "load_average_1_5_15min": {"before": [round(x, 2) for x in load_before],
                                   "after": [round(x, 2) for x in os.getloadavg()]},
        "timings": rows,
        "wall_seconds": round(time.time() - start, 1),
        "command": _common.command_line("calibrate", args.argv),
    }
    _common.write_json(args.out, record)
    print(json.dumps(record["fit"], indent=2))
    print(f"wrote {args.out}")
    return record


def _windows(test, max_seq_len: int):
    """The calibration workload from the test split: a 16-token prompt [1, 16] and four
    scoring windows [4, T + 1] with T = min(128, max_seq_len), 1000 bytes apart where the
    split is long enough (always, for the small model)."""
    import numpy as np

    test = np.asarray(test, np.int32)
    w = min(128, max_seq_len) + 1
    gap = min(1000, (len(test) - w) // 4)
    if gap < 1 or len(test) < 16:
        raise ValueError(f"the test split holds {len(test)} tokens; pipeline calibration "
                         f"needs at least {w + 4} (four {w}-token windows)")
    texts = np.stack([test[i * gap:i * gap + w] for i in range(4)])
    start = min(5000, len(test) - 16)
    return test[None, start:start + 16], texts


def pipeline_calibration(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from ec2moe_jax.bench.pipeline_calibration import calibrate as calibrate_pipeline
    from ec2moe_jax.config import load_config
    from ec2moe_jax.data import prepare_splits
    from ec2moe_jax.models.lm import MoELM, init_params
    from ec2moe_jax.profiles import link
    from ec2moe_jax.sharding import split_end_cloud, unbox
    from ec2moe_jax.training import load_run

    profile = link(args.link)
    if os.path.isfile(os.path.join(args.workdir, "result.json")):
        _common.status(f"loading {args.workdir} and its routing statistics")
        setup, params, splits, freq = load_run(args.workdir)
        cfg, model, source = setup.cfg, setup.model, f"trained ({args.workdir})"
    else:
        _common.status(f"{args.workdir} holds no finished run: timing the small config with "
                       "random parameters")
        cfg = load_config("small")
        model = MoELM(cfg.model)
        params = unbox(init_params(model, jax.random.key(0)))
        splits, source = prepare_splits(cfg.data), "random parameters, uniform routing"
        freq = np.full((cfg.model.num_layers, cfg.model.moe.num_experts), 1.0)
    prompt, texts = _windows(splits.test, cfg.model.max_seq_len)
    _common.status("measuring stages and end-to-end runs at every split (compiling each "
                   "split first)")
    record = calibrate_pipeline(model, params, split_end_cloud(cfg.mesh), profile, freq=freq,
                                prompt=prompt, texts=texts, calibration=args.calibration,
                                repeats=args.repeats)
    record["model"] = f"{cfg.name} ({source})"
    record["command"] = _common.command_line("pipeline-calibration", args.argv)
    _common.write_json(args.out, record)
    print(json.dumps(record["summary"], indent=1))
    print(f"wrote {args.out}")
    return record
