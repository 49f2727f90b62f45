"""Trains the HL-GGN group gates of one end device: the same as ``ec2moe gate`` (``ec2moe gate
--help`` lists the options, defaults and time)."""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["gate", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
