"""Scheduler decision time (results/scheduler_decision_time.json): the same as ``ec2moe bench-
scheduler`` (``ec2moe bench-scheduler --help`` lists the options, defaults and time)."""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["bench-scheduler", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
