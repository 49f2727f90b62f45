"""Logits parity of the HF import against transformers: ``python infer/hf_parity.py``.

Measures max |logit difference| (fp32) on the committed fixtures and, with ``--fresh-seeds``,
on fresh tiny checkpoints of other shapes built by ``tests/fixtures/hf/make_fixtures.py``
(that needs torch and transformers). Writes ``results/hf_parity.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ec2moe_jax.models import load_hf  # noqa: E402
from ec2moe_jax.training import write_json_atomic  # noqa: E402

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")


def parity(folder: str) -> dict:
    model, params = load_hf(folder)
    ref = np.load(os.path.join(folder, "reference.npz"))
    out = np.asarray(model.apply({"params": params}, ref["token_ids"]))
    c = model.cfg
    return {"max_abs_logit_diff": float(np.abs(out - ref["logits"]).max()),
            "logit_abs_max": float(np.abs(ref["logits"]).max()),
            "shape": {"d_model": c.d_model, "layers": c.num_layers, "experts": c.moe.num_experts,
                      "top_k": c.moe.top_k, "heads": c.num_heads, "kv_heads": c.kv_heads}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fresh-seeds", default="", help="e.g. 3,4 (needs torch + transformers)")
    ap.add_argument("--out", default="results/hf_parity.json")
    args = ap.parse_args(argv)
    fixtures = os.path.join(ROOT, "tests", "fixtures", "hf")
    record = {"benchmark": "hf_logits_parity", "method": "measured, fp32 on CPU",
              "fixture": {f: parity(os.path.join(fixtures, f)) for f in FAMILIES}}
    for seed in filter(None, args.fresh_seeds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, os.path.join(fixtures, "make_fixtures.py"), "--out",
                            tmp, "--variant", "fresh", "--seed", seed], check=True,
                           capture_output=True)
            record[f"fresh_seed{seed}"] = {f: parity(os.path.join(tmp, f)) for f in FAMILIES}
    record["command"] = "python infer/hf_parity.py " + " ".join(argv or sys.argv[1:])
    write_json_atomic(args.out, record)
    print(json.dumps({k: {f: v["max_abs_logit_diff"] for f, v in r.items()}
                      for k, r in record.items() if isinstance(r, dict)}, indent=1))
    return record


if __name__ == "__main__":
    main()
