"""``ec2moe``: the one command line of ec2moe-jax (also ``python -m ec2moe_jax``).

One module per group of subcommands registers its parsers; each handler imports JAX and the
library only when it runs, so ``ec2moe --help`` is fast. A documented error (ValueError,
FileNotFoundError, the project's LinkError, WireFormatError, UnsupportedCheckpoint) prints one
line, ``ec2moe <cmd>: error: <message>``, and exits with status 2; ``--debug`` shows the
traceback instead. A new group of subcommands is a module with a ``register(sub)``
function, listed in ``_GROUPS``.

  ec2moe demo                                     # README command 1: server + clients
  ec2moe train --config tiny --set train.steps=5 --data my.txt --workdir runs/mine
  ec2moe generate --workdir runs/mine --plan ec2moe
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ec2moe_jax.cli import _common, api, bench, calibrate, demo, hf, infer, serve, train

_GROUPS = (demo, train, infer, bench, calibrate, hf, serve, api)

_EPILOG = """\
start with `ec2moe demo`. To reproduce the committed results: train (runs/small), then
codec-sweep, calibrate and pipeline-calibration (the scheduler reads their JSON), then demo,
demo-pipeline, scheduler-report, bench-scheduler and bench; hlggn-eval, bench-moe-layer and
hf-parity stand alone. `ec2moe COMMAND --help` says what each writes and how long it takes."""


def parser() -> argparse.ArgumentParser:
    """The ``ec2moe`` argument parser with every subcommand."""
    ap = argparse.ArgumentParser(
        prog="ec2moe", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="End-cloud Mixture-of-Experts inference in JAX (after EC2MoE): train the "
                    "MoE LM,\nrun it split between an end device and a cloud, benchmark it.",
        epilog=_EPILOG)
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for group in _GROUPS:
        group.register(sub)
    return ap


def _parse(argv: list[str]) -> argparse.Namespace:
    args = parser().parse_args(argv)
    # What followed the subcommand, for the "command" field of result JSON.
    args.argv = argv[argv.index(args.cmd) + 1:]
    return args


def _dispatch(args: argparse.Namespace) -> Any:
    if args.needs_devices:
        _common.needs_fake_devices()
    return args.handler(args)


def run(argv: list[str] | None = None) -> Any:
    """Parses ``argv`` and runs the subcommand; returns its result (a dict or text).

    Errors propagate (:func:`main` turns them into one-line reports).
    """
    return _dispatch(_parse(sys.argv[1:] if argv is None else list(argv)))


def _documented(error: BaseException) -> bool:
    if isinstance(error, ValueError | FileNotFoundError):  # WireFormatError, Unsupported...
        return True
    link = sys.modules.get("ec2moe_jax.pipeline.link")
    return link is not None and isinstance(error, link.LinkError)


def main(argv: list[str] | None = None) -> int:
    """The console script: runs a subcommand and turns documented errors into one line.

    Returns:
      0 on success, 2 on a documented error (argparse's usage errors exit with 2 too),
      130 when interrupted.
    """
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    try:
        _dispatch(args)
    except KeyboardInterrupt:
        print(f"ec2moe {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or not _documented(e):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"ec2moe {args.cmd}: error: {message}", file=sys.stderr)
        return 2
    return 0
