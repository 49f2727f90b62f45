"""The evaluation, EC2MoE against its ablations and baselines (results/bench.json, .md, .png): the
same as ``ec2moe bench`` (``ec2moe bench --help`` lists the options, defaults and time)."""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["bench", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
