"""HL-GGN evaluation: ``python infer/hlggn_eval.py [--workdir runs/small]``.

For three device profiles (about 25%, 50% and 75% of the end layers' experts resident):
hardware-aware expert selection from routing statistics, group-gate training (LM frozen),
and bits/char, routing recall and gate FLOPs on the held-out test split. Writes
``results/hlggn.json`` (a list, one object per profile; method in
:mod:`ec2moe_jax.bench.hlggn`). Needs a trained model (``python train/main.py``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from ec2moe_jax.bench.hlggn import run  # noqa: E402
from ec2moe_jax.training import write_json_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="runs/small")
    ap.add_argument("--end-layers", type=int, default=2, help="layers run on the end device")
    ap.add_argument("--gate-steps", type=int, default=100)
    ap.add_argument("--eval-batches", type=int, default=30, help="test batches of 16 x 128")
    ap.add_argument("--adapt-steps", type=int, default=400,
                    help="residency-aware LM fine-tune steps for the extra rows (0: skip)")
    ap.add_argument("--out", default="results/hlggn.json")
    args = ap.parse_args(argv)
    rows = run(args.workdir, num_end_layers=args.end_layers, gate_steps=args.gate_steps,
               eval_batches=args.eval_batches, adapt_steps=args.adapt_steps)
    command = "python infer/hlggn_eval.py " + " ".join(argv or sys.argv[1:])
    for row in rows:
        row["method"] = (f"measured on {jax.devices()[0].platform}, jax {jax.__version__}: "
                         f"bits/char on the first {args.eval_batches} batches of 16 disjoint "
                         "128-byte windows of the test split")
        row["command"] = command.strip()
    write_json_atomic(args.out, rows)
    for r in rows:
        print(f"{r['profile']:>32}  resident {r['resident_fraction']:.2f}  "
              f"full {r['bits_per_char_full']:.3f}  masked {r['bits_per_char_masked_topk']:.3f}"
              f"  gate {r['bits_per_char_group_gate']:.3f}  recall {r['routing_recall_at_k']:.3f}"
              f"  flops {r['gate_flops_ratio']:.3f}")
    return rows


if __name__ == "__main__":
    main()
