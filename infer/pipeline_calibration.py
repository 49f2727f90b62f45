"""Pipeline calibration: measured per-stage and end-to-end times of the end-cloud pipeline
on this machine vs the scheduler's cost model (results/pipeline_calibration.json).

  python infer/pipeline_calibration.py [--workdir runs/small] [--link lte]

Uses the trained model in --workdir if present (its routing statistics), else the small
config with random parameters and uniform routing (timings do not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ec2moe_jax.bench.pipeline_calibration import calibrate  # noqa: E402
from ec2moe_jax.config import load_config  # noqa: E402
from ec2moe_jax.data import prepare_splits  # noqa: E402
from ec2moe_jax.models.lm import MoELM, init_params  # noqa: E402
from ec2moe_jax.profiles import link  # noqa: E402
from ec2moe_jax.sharding import split_end_cloud, unbox  # noqa: E402
from ec2moe_jax.training.checkpoint import write_json_atomic  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/small")
    ap.add_argument("--link", default="lte")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join("results", "pipeline_calibration.json"))
    args = ap.parse_args(argv)
    cfg = load_config("small")
    if os.path.exists(os.path.join(args.workdir, "result.json")):
        from ec2moe_jax.bench.hlggn import load_run

        setup, params, splits, freq = load_run(args.workdir)
        model, source = setup.model, f"trained ({args.workdir})"
    else:
        model = MoELM(cfg.model)
        params = unbox(init_params(model, jax.random.key(0)))
        splits, source = prepare_splits(cfg.data), "random parameters, uniform routing"
        freq = np.full((cfg.model.num_layers, cfg.model.moe.num_experts), 1.0)
    test = np.asarray(splits.test, np.int32)
    texts = np.stack([test[i * 1000:i * 1000 + 129] for i in range(4)])
    prompt = test[None, 5000:5016]
    record = calibrate(model, params, split_end_cloud(cfg.mesh), link(args.link), freq=freq,
                       prompt=prompt, texts=texts, repeats=args.repeats)
    record["model"] = f"small ({source})"
    write_json_atomic(args.out, record)
    print(json.dumps(record["summary"], indent=1))
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
