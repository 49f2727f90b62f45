"""The README's main command: train the small model briefly (once) and print a sample.

  python infer/demo.py            # ~6 minutes on 2 CPU cores the first time, seconds after

If ``runs/small`` holds a fully trained small model (``python train/main.py``), the demo
samples from it instead of training its own.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ec2moe_jax.config import load_config  # noqa: E402
from ec2moe_jax.data import ByteTokenizer  # noqa: E402
from ec2moe_jax.models import generate  # noqa: E402
from ec2moe_jax.training import load_params, train  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500, help="brief training steps")
    ap.add_argument("--prompt", default="ROMEO:\n")
    ap.add_argument("--temperature", type=float, default=0.7)
    args = ap.parse_args(argv)

    full = os.path.join("runs", "small")
    if os.path.exists(os.path.join(full, "result.json")):
        workdir = full
        print(f"using the fully trained small model in {full}")
    else:
        workdir = os.path.join("runs", "demo")
        cfg = load_config("small").replace(train__steps=args.steps, train__warmup_steps=50,
                                           train__eval_every=args.steps,
                                           train__checkpoint_every=args.steps)
        result = train(cfg, workdir, final_eval_batches=32)
        print(f"trained {result['steps']} steps in {result['wall_seconds']:.0f} s: "
              f"{result['bits_per_char_test']:.3f} bits/char on the first 32 test batches "
              "(measured; the full run, python train/main.py, reaches the README's figure)")
    setup, params = load_params(workdir)
    tok = ByteTokenizer()
    prompt = jnp.asarray(tok.encode(args.prompt), jnp.int32)[None]
    out = generate(setup.model, params, prompt, 300, temperature=args.temperature,
                   rng=jax.random.key(0))
    text = args.prompt + tok.decode(jax.device_get(out[0]))
    print("-" * 60)
    print(text)
    print("-" * 60)
    return text


if __name__ == "__main__":
    main()
