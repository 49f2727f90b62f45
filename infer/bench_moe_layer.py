"""MoE layer forward vs a dense matmul of equal FLOPs (results/moe_layer.json): the same as
``ec2moe bench-moe-layer`` (``ec2moe bench-moe-layer --help`` lists the options, defaults and
time)."""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["bench-moe-layer", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
