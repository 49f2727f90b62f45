"""Scheduler report (simulated): ``python infer/scheduler_report.py``.

Writes ``results/scheduler.json`` (see :mod:`ec2moe_jax.bench.scheduler_report`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ec2moe_jax.bench.scheduler_report import run  # noqa: E402
from ec2moe_jax.scheduler import load_calibration  # noqa: E402
from ec2moe_jax.training import write_json_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calibration", default="results/calibration_cpu.json")
    ap.add_argument("--gap-instances", type=int, default=200)
    ap.add_argument("--routing-stats", default=None, metavar="WORKDIR",
                    help="also compare routing statistics measured through this trained model "
                         "(e.g. runs/small) with synthetic ones; optional")
    ap.add_argument("--plot", default="results/scheduler.png",
                    help="PNG path ('' to skip; needs matplotlib)")
    ap.add_argument("--out", default="results/scheduler.json")
    args = ap.parse_args(argv)
    record = run(load_calibration(args.calibration), args.gap_instances, args.routing_stats,
                 args.plot or None)
    record["command"] = "python infer/scheduler_report.py " + " ".join(argv or sys.argv[1:])
    write_json_atomic(args.out, record)
    print(json.dumps(record["gap_vs_optimum"], indent=2))
    return record


if __name__ == "__main__":
    main()
