"""The cloud server of a trained model over gRPC: the same as ``ec2moe serve`` (``ec2moe serve
--help`` lists the options: bind address, slots, TTL, auth, TLS, metrics, warm-up).

  python infer/serve.py --workdir runs/small --port 50051
"""

import sys

from ec2moe_jax import cli


def main() -> int:
    return cli.main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
