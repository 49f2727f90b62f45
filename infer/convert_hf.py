"""Converts a Hugging Face MoE folder into an orbax checkpoint workdir: the same as ``ec2moe
convert-hf`` (``ec2moe convert-hf --help`` lists the options, defaults and time)."""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["convert-hf", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
