"""Trains (or resumes) the MoE language model: the same as ``ec2moe train`` (``ec2moe train
--help`` lists the options, defaults and time)."""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
