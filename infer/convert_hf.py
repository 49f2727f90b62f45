"""Convert a Hugging Face MoE folder into our orbax checkpoint workdir.

  python infer/convert_hf.py --hf path/to/hf_folder --workdir runs/imported
  python infer/main.py generate --workdir runs/imported --prompt-ids 1,2,3

Supported: Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE (safetensors, one file or sharded); no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ec2moe_jax.models.hf import experiment_config, load_hf, num_params  # noqa: E402
from ec2moe_jax.training import save_params  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="folder with config.json + safetensors")
    ap.add_argument("--workdir", required=True, help="where to write the orbax checkpoint")
    ap.add_argument("--dispatch", default="einsum", choices=["einsum", "gather", "ragged"])
    args = ap.parse_args(argv)
    model, params = load_hf(args.hf, dispatch=args.dispatch)
    name = "hf_" + os.path.basename(os.path.normpath(args.hf))
    save_params(experiment_config(model.cfg, name), args.workdir, params)
    info = {"workdir": args.workdir, "layers": model.cfg.num_layers,
            "experts": model.cfg.moe.num_experts, "params": num_params(params)}
    print(json.dumps(info))
    return info


if __name__ == "__main__":
    main()
