"""Scheduler report, simulated (results/scheduler.json, results/scheduler.png): the same as
``ec2moe scheduler-report`` (``ec2moe scheduler-report --help`` lists the options, defaults and
time)."""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["scheduler-report", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
