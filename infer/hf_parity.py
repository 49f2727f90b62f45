"""Logits parity of the HF import against transformers (results/hf_parity.json): the same as
``ec2moe hf-parity`` (``ec2moe hf-parity --help`` lists the options, defaults and time)."""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["hf-parity", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
