"""Codec rank sweep at a split point: ``python infer/codec_sweep.py [--workdir runs/small]``.

Writes ``results/codec_sweep.json`` (method in :mod:`ec2moe_jax.bench.codec_sweep`). Needs a
trained model (``python train/main.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ec2moe_jax.bench.codec_sweep import DEFAULT_SETTINGS, run  # noqa: E402
from ec2moe_jax.training import write_json_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="runs/small")
    ap.add_argument("--split", type=int, default=None, help="default: num_layers // 2")
    ap.add_argument("--settings", default=None,
                    help="comma-separated rank:bits, e.g. 32:int8,112:int4 (default: the sweep)")
    ap.add_argument("--steps", type=int, default=150, help="fine-tuning steps per setting")
    ap.add_argument("--eval-batches", type=int, default=40)
    ap.add_argument("--out", default="results/codec_sweep.json")
    args = ap.parse_args(argv)
    settings = DEFAULT_SETTINGS
    if args.settings:
        settings = tuple((int(r), b) for r, b in (s.split(":") for s in args.settings.split(",")))
    record = run(args.workdir, args.split, settings, finetune_steps=args.steps,
                 eval_batches=args.eval_batches)
    record["command"] = "python infer/codec_sweep.py " + " ".join(argv or sys.argv[1:])
    write_json_atomic(args.out, record)
    print(json.dumps({k: record[k] for k in ("baseline_bf16", "best_meeting_target",
                                             "closest_at_8x")}, indent=2))
    return record


if __name__ == "__main__":
    main()
