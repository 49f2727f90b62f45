"""``python -m ec2moe_jax``: the ``ec2moe`` command line (see :mod:`ec2moe_jax.cli`)."""

import sys

from ec2moe_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
