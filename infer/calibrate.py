"""Calibrates the scheduler's roofline on this machine (results/calibration_cpu.json): the same as
``ec2moe calibrate`` (``ec2moe calibrate --help`` lists the options, defaults and time)."""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["calibrate", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
