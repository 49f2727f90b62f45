"""Codec rank sweep at a split point (results/codec_sweep.json): the same as ``ec2moe codec-sweep``
(``ec2moe codec-sweep --help`` lists the options, defaults and time)."""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["codec-sweep", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
