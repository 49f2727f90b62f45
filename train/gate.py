"""Train the HL-GGN group gates of one end device: ``python train/gate.py [--device
raspberry-pi-5-8gb] [--memory-mib 8.3] [--end-layers 2] [--workdir runs/small]``.

Selects the resident experts the device's memory holds (from routing statistics of the
trained LM), then trains the gates with the LM frozen; checkpoints go to
``<workdir>/gates/<profile>``. ``--live`` profiles this machine instead of a preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ec2moe_jax.bench.hlggn import train_for_profile  # noqa: E402
from ec2moe_jax.profiles import device, measure  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default="runs/small")
    ap.add_argument("--device", default="raspberry-pi-5-8gb", help="a preset name")
    ap.add_argument("--live", action="store_true", help="profile this machine instead")
    ap.add_argument("--memory-mib", type=float, default=8.3,
                    help="memory for the model's weights (default: half the experts of 2 "
                         "end layers of the small model)")
    ap.add_argument("--end-layers", type=int, default=2, help="layers run on the end")
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args(argv)
    profile = measure() if args.live else device(args.device)
    profile = dataclasses.replace(profile.with_memory(args.memory_mib * 2**20),
                                  name=f"{profile.name}@{args.memory_mib:g}MiB")
    summary, metrics = train_for_profile(args.workdir, profile, num_end_layers=args.end_layers,
                                         steps=args.steps)
    out = {**summary, "validation": metrics}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
