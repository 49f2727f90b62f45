"""Train (or resume) the MoE LM: ``python train/main.py [--config small] [--workdir runs/small]``.

Intentionally short: parse flags, build the config, call :func:`ec2moe_jax.training.train`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ec2moe_jax.config import load_config  # noqa: E402
from ec2moe_jax.training import train  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="small", help="tiny | small | base | path to a .py")
    ap.add_argument("--workdir", default=None, help="run directory (default runs/<config>)")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps")
    ap.add_argument("--data", default=None, help="comma-separated UTF-8 text files to train on")
    ap.add_argument("--result", default=None, help="also write the result JSON here")
    ap.add_argument("--plot", default=None, help="write the learning curve PNG here")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)

    cfg = load_config(args.config)
    if args.steps is not None:
        cfg = cfg.replace(train__steps=args.steps,
                          train__warmup_steps=min(cfg.train.warmup_steps, args.steps // 10))
    if args.data is not None:
        cfg = cfg.replace(data__source=args.data)
    workdir = args.workdir or os.path.join("runs", cfg.name)
    result = train(cfg, workdir, progress=not args.no_progress)
    result.pop("state")
    print(json.dumps(result, indent=2))
    if args.result:
        from ec2moe_jax.training import write_json_atomic

        write_json_atomic(args.result, {**result, "command": "python " + " ".join(sys.argv)})
    if args.plot and "curve" in result:
        from ec2moe_jax.bench.plots import plot_training_curve

        plot_training_curve(result, args.plot)
    return result


if __name__ == "__main__":
    main()
