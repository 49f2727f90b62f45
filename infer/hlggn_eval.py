"""HL-GGN evaluation: expert selection and group gates (results/hlggn.json): the same as ``ec2moe
hlggn-eval`` (``ec2moe hlggn-eval --help`` lists the options, defaults and time)."""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["hlggn-eval", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
