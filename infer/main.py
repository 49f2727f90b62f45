"""Generate from or evaluate a trained checkpoint.

  python infer/main.py generate --workdir runs/small --prompt "ROMEO:" [--temperature 0.8]
  python infer/main.py eval --workdir runs/small [--split test] [--json]
  python infer/main.py generate --plan ec2moe --link lte        # through the end-cloud pipeline
  python infer/main.py score --plan best-split --text "To be, or not to be"

``--plan``: a plan JSON, a baseline (cloud-only, end-only, end-only-drop, end-only-swap,
best-split) or ec2moe (the scheduler's plan for --end-device over --link).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "score" in sys.argv or "--plan" in sys.argv:  # the pipeline needs the end + cloud devices
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ec2moe_jax.data import ByteTokenizer, prepare_splits  # noqa: E402
from ec2moe_jax.models import generate  # noqa: E402
from ec2moe_jax.training import evaluate, load_params  # noqa: E402


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="sample text with the KV cache")
    g.add_argument("--workdir", default="runs/small")
    g.add_argument("--hf", default=None,
                   help="generate straight from a Hugging Face folder instead of a workdir")
    g.add_argument("--prompt", default="ROMEO:\n")
    g.add_argument("--prompt-ids", default=None,
                   help="comma-separated token ids (for imported models with their own "
                        "vocabulary); prints ids instead of text")
    g.add_argument("--max-new-tokens", type=int, default=300)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--plan", default=None, help="run through the end-cloud pipeline")
    s = sub.add_parser("score", help="bits/char of --text through the end-cloud pipeline")
    s.add_argument("--workdir", default="runs/small")
    s.add_argument("--text", default="ROMEO:\nBut soft, what light through yonder window "
                   "breaks? It is the east, and Juliet is the sun.")
    s.add_argument("--plan", default="ec2moe")
    for p in (g, s):
        p.add_argument("--link", default="lte", help="link preset: 3g, lte, wifi, 5g")
        p.add_argument("--end-device", default="this-cpu", help="this-cpu or a device preset")
    e = sub.add_parser("eval", help="bits/char on a held-out split")
    e.add_argument("--workdir", default="runs/small")
    e.add_argument("--split", default="test", choices=["val", "test"])
    e.add_argument("--stride", type=int, default=-1,
                   help="eval window stride (default: the config's; 0 = non-overlapping)")
    e.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = ap.parse_args(argv)

    if getattr(args, "plan", None):
        return _pipeline(args)
    if getattr(args, "hf", None):
        from ec2moe_jax.models import load_hf

        model, params = load_hf(args.hf)
    else:
        setup, params = load_params(args.workdir)
        cfg, model = setup.cfg, setup.model
    if args.cmd == "generate":
        tok = ByteTokenizer()
        ids = ([int(i) for i in args.prompt_ids.split(",")] if args.prompt_ids
               else tok.encode(args.prompt))
        prompt = jnp.asarray(ids, jnp.int32)[None]
        limit = model.cfg.max_seq_len - prompt.shape[1]
        out = generate(model, params, prompt, min(args.max_new_tokens, limit),
                       temperature=args.temperature, rng=jax.random.key(args.seed))
        if args.prompt_ids:
            text = ",".join(str(int(i)) for i in jax.device_get(out[0]))
            print(text)
            return text
        text = args.prompt + tok.decode(jax.device_get(out[0]))
        print(text)
        return text
    splits = prepare_splits(cfg.data)
    stride = None if args.stride == 0 else args.stride
    bpc = evaluate(setup, params, getattr(splits, args.split), stride=stride)
    stride = cfg.train.eval_stride if stride == -1 else stride
    record = {"workdir": args.workdir, "split": args.split, "bits_per_char": bpc,
              "window": cfg.train.seq_len, "stride": stride, "method": "measured"}
    print(json.dumps(record) if args.json else f"{args.split} bits/char: {bpc:.4f}")
    return record


def _pipeline(args):
    from ec2moe_jax.pipeline import cli
    from ec2moe_jax.profiles import link

    tok = ByteTokenizer()
    ids = np.asarray(tok.encode(args.prompt if args.cmd == "generate" else args.text))[None]
    rec = cli.run(args.cmd, args.workdir, ids.astype(np.int32), args.plan, link(args.link),
                  args.end_device, max_new_tokens=getattr(args, "max_new_tokens", 0),
                  temperature=getattr(args, "temperature", 0.0))
    if args.cmd == "generate":
        print(args.prompt + tok.decode(rec["output"][0].tolist()))
    else:
        print(f"bits/char {rec['bits_per_char']:.4f} ({rec['method']})")
    return rec


if __name__ == "__main__":
    main()
