"""The evaluation: ``python infer/bench.py [--workdir runs/small]``.

EC2MoE against its ablations (no hardware-aware selection, masked top-k instead of the group
gate, no codec, static plan) and the baselines (cloud-only, end-only, best single split) in
90 regimes (5 workloads x 2 cloud classes x 1/8/64 end devices x 3 bandwidths), plus a load
sweep, a bandwidth sweep and a timeline through a bandwidth drop (all simulated with the
calibrated cost model), bits/char of every strategy's plans (measured through the real
pipeline on the trained small model) and the simulator's validation against real stage
execution on this machine. Writes ``results/bench.json``, ``results/bench.md`` and
``results/bench.png``; about a quarter of an hour on 2 CPU cores. Method:
:mod:`ec2moe_jax.bench.evaluation`.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ec2moe_jax.bench import evaluation, report  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/small",
                    help="trained model for quality and validation (python train/main.py)")
    ap.add_argument("--out", default="results/bench.json")
    ap.add_argument("--quick", action="store_true",
                    help="a 4-regime grid and no validation (a smoke test, minutes)")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--no-validation", action="store_true")
    ap.add_argument("--gate-steps", type=int, default=0,
                    help="group-gate training steps for masks without a saved gate; 0 "
                         "(default): the least-squares-initialised gate for every mask (about "
                         "10 s per mask; training costs about 4 s per step here)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.workdir) and not (args.no_quality and args.no_validation):
        ap.error(f"--workdir {args.workdir} does not exist: train the small model first "
                 "(python train/main.py, about 25 min) or pass --no-quality --no-validation")
    regimes = None
    if args.quick:
        regimes = evaluation.regimes(workloads=("score-128", "private-generate-128+32"),
                                     clouds=("t4",), devices=(1, 8), bandwidths=(20.0,))
    record = report.run(args.workdir, regimes=regimes, quality=not args.no_quality,
                        validation=not (args.no_validation or args.quick),
                        gate_steps=args.gate_steps)
    record["command"] = ("python infer/bench.py " + " ".join(argv or sys.argv[1:])).strip()
    stem = os.path.splitext(args.out)[0]
    record = report.write(record, args.out, stem + ".md", stem + ".png")
    print(record["tables_markdown"])
    print(f"wrote {args.out}, {stem}.md, {stem}.png in {record['wall_seconds']:.0f} s")
    return record


if __name__ == "__main__":
    main()
