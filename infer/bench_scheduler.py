"""Scheduler decision time (measured): ``python infer/bench_scheduler.py``.

Writes ``results/scheduler_decision_time.json`` (see :mod:`ec2moe_jax.bench.scheduler_bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ec2moe_jax.bench.scheduler_bench import run  # noqa: E402
from ec2moe_jax.training import write_json_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--devices", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default="results/scheduler_decision_time.json")
    args = ap.parse_args(argv)
    record = run(args.layers, args.experts, args.devices, args.repeats)
    record["command"] = "python infer/bench_scheduler.py " + " ".join(argv or sys.argv[1:])
    write_json_atomic(args.out, record)
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
