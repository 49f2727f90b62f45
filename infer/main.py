"""Generate from, score with or evaluate a trained model: the same as ``ec2moe generate``, ``ec2moe
score`` and ``ec2moe eval``.

  python infer/main.py generate --prompt "ROMEO:"      # = ec2moe generate --prompt "ROMEO:"
  python infer/main.py score --plan best-split          # = ec2moe score --plan best-split

``ec2moe COMMAND --help`` lists the options, defaults and times.
"""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
