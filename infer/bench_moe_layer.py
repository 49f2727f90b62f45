"""MoE layer forward vs a dense matmul of equal FLOPs: ``python infer/bench_moe_layer.py``.

Writes ``results/moe_layer.json`` (see :mod:`ec2moe_jax.bench.moe_layer` for the method).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ec2moe_jax.bench.moe_layer import run  # noqa: E402
from ec2moe_jax.training import write_json_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dispatch", default="gather,einsum,ragged",
                    help="comma-separated; the first is the fast path that ratio_to_dense uses")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="results/moe_layer.json")
    args = ap.parse_args(argv)
    record = run(tokens=args.tokens, dispatches=tuple(args.dispatch.split(",")),
                 rounds=args.rounds)
    record["command"] = "python infer/bench_moe_layer.py " + " ".join(argv or sys.argv[1:])
    write_json_atomic(args.out, record)
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
