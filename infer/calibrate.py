"""Calibrates the scheduler's roofline on this machine: ``python infer/calibrate.py``.

Writes ``results/calibration_cpu.json`` (see :mod:`ec2moe_jax.scheduler.calibrate`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from ec2moe_jax.config import load_config  # noqa: E402
from ec2moe_jax.profiles import measure  # noqa: E402
from ec2moe_jax.scheduler.calibrate import fit, time_stages  # noqa: E402
from ec2moe_jax.training import write_json_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="small")
    ap.add_argument("--tokens", default="1,16,64,256")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="results/calibration_cpu.json")
    args = ap.parse_args(argv)
    start = time.time()
    load_before = os.getloadavg()
    profile = measure()
    rows = time_stages(load_config(args.config).model,
                       tuple(int(t) for t in args.tokens.split(",")), args.repeats)
    record = {
        "benchmark": "scheduler_calibration",
        "method": f"measured on this CPU ({platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cores, jax {jax.__version__}); the CPU is shared with "
                  "another engineer's niced jobs, so every timing is the median of repeats "
                  "(round-robin over stages) after two warm-up calls",
        "model": args.config,
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
        "command": "python infer/calibrate.py " + " ".join(argv or sys.argv[1:]),
    }
    write_json_atomic(args.out, record)
    print(json.dumps(record["fit"], indent=2))
    return record


if __name__ == "__main__":
    main()
