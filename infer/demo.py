"""README command 1: the end-cloud demo (results/demo.json, results/demo.png): the same as ``ec2moe
demo`` (``ec2moe demo --help`` lists the options, defaults and time)."""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["demo", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
