"""``ec2moe convert-hf`` (a Hugging Face MoE folder into a workdir) and ``ec2moe hf-parity``
(logits parity of the import against transformers)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

from ec2moe_jax.cli import _common

# The families the importer reads (models/hf_config.py SUPPORTED), each with a fixture.
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "granitemoe", "gpt_oss")


_CONVERT = """\
Convert a Hugging Face MoE folder (config.json + safetensors, one file or sharded, fp32,
bf16, block-FP8 or GPT-OSS's MXFP4 experts; Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE,
GraniteMoE, GPT-OSS; no torch needed) into an orbax checkpoint workdir that generate,
score and eval read, whole or split with --plan. Prints JSON: parameter count, the routed
experts' bytes per MoE layer and the dtype stored (float32: quantized weights are
dequantized at load). Seconds for small checkpoints; about the time to read the weights
from disk for large ones.

  ec2moe convert-hf --hf path/to/hf_folder --workdir runs/imported
  ec2moe generate --workdir runs/imported --prompt-ids 1,2,3"""

_PARITY = """\
Logits parity of the Hugging Face import against transformers: max |logit difference|
(fp32) and whether 16 greedy tokens equal transformers' generate, for every family, on the
committed fixtures (tests/fixtures/hf) and, with --fresh-seeds, on fresh tiny checkpoints
of other shapes built by tests/fixtures/hf/make_fixtures.py (that needs torch and
transformers). Writes <out> (results/hf_parity.json). Seconds for the fixtures; about
a minute per fresh seed (building checkpoints with transformers)."""


def register(sub) -> None:
    c = _common.add_parser(sub, "convert-hf", help="import a Hugging Face MoE checkpoint",
                           description=_CONVERT)
    c.add_argument("--hf", required=True, help="folder with config.json + safetensors")
    c.add_argument("--workdir", required=True, help="where to write the orbax checkpoint")
    c.add_argument("--dispatch", default="einsum", choices=["einsum", "gather", "ragged"],
                   help="expert dispatch implementation the imported model uses")
    c.set_defaults(handler=convert_hf)

    p = _common.add_parser(sub, "hf-parity", help="logits parity of the HF import (measured)",
                           description=_PARITY)
    p.add_argument("--fixtures", default=os.path.join("tests", "fixtures", "hf"),
                   help="folder of fixture checkpoints, one per family, each with a "
                        "reference.npz (token_ids, logits)")
    p.add_argument("--fresh-seeds", default="",
                   help="comma-separated seeds of fresh checkpoints, e.g. 3,4 (needs torch + "
                        "transformers)")
    p.add_argument("--out", default=os.path.join(_common.RESULTS, "hf_parity.json"),
                   help="JSON path")
    p.set_defaults(handler=hf_parity)


def convert_hf(args: argparse.Namespace) -> dict:
    from ec2moe_jax.models.hf import experiment_config, import_report, load_hf
    from ec2moe_jax.training import save_params

    _common.status(f"reading {args.hf}")
    model, params = load_hf(args.hf, dispatch=args.dispatch)
    name = "hf_" + os.path.basename(os.path.normpath(args.hf))
    save_params(experiment_config(model.cfg, name), args.workdir, params)
    info = {"workdir": args.workdir, **import_report(model, params)}
    print(json.dumps(info))
    return info


def _parity(folder: str) -> dict:
    from ec2moe_jax.models import reference_parity

    return reference_parity(folder, greedy=True)[0]


def hf_parity(args: argparse.Namespace) -> dict:
    missing = [f for f in FAMILIES if not os.path.isdir(os.path.join(args.fixtures, f))]
    if missing:
        raise FileNotFoundError(f"--fixtures {args.fixtures!r} lacks {missing}: run from the "
                                "repository root or point --fixtures at tests/fixtures/hf")
    record = {"benchmark": "hf_logits_parity", "method": "measured, fp32 on CPU",
              "fixture": {f: _parity(os.path.join(args.fixtures, f)) for f in FAMILIES}}
    maker = os.path.join(args.fixtures, "make_fixtures.py")
    seeds = [s.strip() for s in args.fresh_seeds.split(",") if s.strip()]
    absent = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if seeds and absent:
        raise ValueError(f"--fresh-seeds needs {' and '.join(absent)} (pip install "
                         "torch==2.13.0 first, then transformers>=5)")
    for seed in seeds:
        _common.status(f"building fresh checkpoints with transformers (seed {seed})")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, maker, "--out", tmp, "--variant", "fresh", "--seed",
                            seed], check=True, capture_output=True)
            record[f"fresh_seed{seed}"] = {f: _parity(os.path.join(tmp, f)) for f in FAMILIES}
    record["command"] = _common.command_line("hf-parity", args.argv)
    _common.write_json(args.out, record)
    print(json.dumps({k: {f: [v["max_abs_logit_diff"], v.get("greedy_tokens_equal")]
                          for f, v in r.items()}
                      for k, r in record.items() if isinstance(r, dict)}, indent=1))
    return record
