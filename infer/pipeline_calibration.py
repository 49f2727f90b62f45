"""Pipeline stage times vs the cost model (results/pipeline_calibration.json): the same as ``ec2moe
pipeline-calibration`` (``ec2moe pipeline-calibration --help`` lists the options, defaults and
time)."""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["pipeline-calibration", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
