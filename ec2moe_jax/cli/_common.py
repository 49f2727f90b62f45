"""Helpers shared by the ``ec2moe`` subcommands: parsers, configs, workdirs and output.

Nothing here imports JAX: ``ec2moe --help`` and argument errors stay fast, and the
subcommands that need the end and cloud submeshes can still ask for 8 fake CPU devices
before JAX starts its backend.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from typing import Any

RUNS = "runs"  # where trained workdirs live, relative to the working directory
RESULTS = "results"  # where benchmark JSON is written, relative to the working directory
FAKE_DEVICES = 8  # end 2 + cloud 6 (the configs' default mesh split)

# What makes each kind of workdir, for error messages.
TRAIN_SMALL = "ec2moe train --config small --workdir runs/small"
DEMO = "ec2moe demo"


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults after each help string, keeps descriptions' line breaks, and leaves out
    "(default: None)" and "(default: False)", which say nothing to a user."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        if isinstance(action.default, str) and not action.default.isprintable():
            return f"{action.help} (default: %(default)r)"  # "ROMEO:\n", not a line break
        return super()._get_help_string(action)


def add_parser(sub, name: str, *, help: str, description: str, devices: bool = False,
               epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser with the shared formatter and ``--debug``.

    Args:
      sub: the ``add_subparsers`` object of the ``ec2moe`` parser.
      name: the subcommand.
      help: one line for ``ec2moe --help``.
      description: what the subcommand does, what it writes and how long it takes.
      devices: the subcommand runs the end and cloud submeshes, so it needs 8 devices
        (``JAX_NUM_CPU_DEVICES=8`` is set before JAX starts unless the user set it).
      epilog: text after the options (formats, examples).
    """
    p = sub.add_parser(name, help=help, description=description, epilog=epilog,
                       formatter_class=Formatter)
    # SUPPRESS: a flag before the subcommand (ec2moe --debug train) is not reset here.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    p.set_defaults(needs_devices=devices)
    return p


def add_config_args(p: argparse.ArgumentParser, default: str = "small") -> None:
    """``--config NAME`` and repeatable ``--set section.field=value``."""
    p.add_argument("--config", default=default,
                   help="named config (tiny, small, small_fine, base) or a path to a "
                        "configs-style .py file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   dest="overrides",
                   help="override one config field, e.g. --set model.moe.num_experts=16 or "
                        "--set train.steps=500 (repeatable; sections: data, model, model.moe, "
                        "mesh, train)")


def build_config(args: argparse.Namespace):
    """The config named by ``--config`` with ``--set`` overrides applied.

    Raises:
      ValueError: an unknown config, or a bad key or value (the message names it).
    """
    from ec2moe_jax.config import load_config

    return load_config(args.config, tuple(args.overrides))


def temperature(text: str) -> float:
    """The ``--temperature`` argument type: a finite number >= 0 (0 = greedy).

    Raises:
      argparse.ArgumentTypeError: anything else ("nan" would sample garbage, a negative or
        infinite temperature has no meaning); argparse prints it as a one-line usage error.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0 (0 = greedy)")
    return value


def argument_bytes(text: str) -> bytes:
    """The bytes a user typed in a command-line argument. Python decodes ``argv`` with
    ``surrogateescape``, so bytes that are not valid UTF-8 come back exactly as given."""
    return text.encode("utf-8", "surrogateescape")


def printable(text: str) -> str:
    """``text`` safe to print: bytes of an argument that were not valid UTF-8 become U+FFFD
    (printing them as they are would fail on a UTF-8 terminal)."""
    return argument_bytes(text).decode("utf-8", "replace")


def needs_fake_devices() -> None:
    """Asks JAX for :data:`FAKE_DEVICES` CPU devices unless the user chose a number.

    The package's ``__init__`` may already have imported JAX, which reads the variable at
    import time, so the flag is set through ``jax.config`` too (valid until the first JAX
    computation; after that JAX raises RuntimeError naming the problem).
    """
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(FAKE_DEVICES))
    if "jax" in sys.modules:
        import jax

        want = int(os.environ["JAX_NUM_CPU_DEVICES"])
        if jax.config.jax_num_cpu_devices != want:
            jax.config.update("jax_num_cpu_devices", want)


def status(message: str) -> None:
    """A progress line on stderr (stdout stays for results a script may parse)."""
    print(message, file=sys.stderr, flush=True)


def command_line(name: str, argv: list[str]) -> str:
    """The command recorded in a result JSON: ``ec2moe <name> <args>``."""
    return shlex.join(["ec2moe", name, *argv])


def write_json(path: str, record: Any) -> None:
    from ec2moe_jax.files import write_json_atomic

    write_json_atomic(path, record)


def _is_trained(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _is_finished(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "result.json"))


def trained_workdirs(root: str = RUNS) -> list[str]:
    """Workdirs under ``root`` that hold a model (a ``config.json`` and checkpoints)."""
    if not os.path.isdir(root):
        return []
    found = [os.path.join(root, d) for d in sorted(os.listdir(root))]
    return [d for d in found if _is_trained(d)]


def _found(root: str) -> str:
    found = trained_workdirs(root)
    if not found:
        return f"no trained workdir under {root}/"
    return f"trained workdirs under {root}/: {', '.join(found)} (pass one with --workdir)"


def default_workdir(root: str = RUNS) -> str:
    """``runs/small`` if it holds a finished run, else ``runs/demo`` if that does.

    Raises:
      FileNotFoundError: neither does; the message lists the trained workdirs under ``root``
        and the commands that make one.
    """
    for name in ("small", "demo"):
        path = os.path.join(root, name)
        if _is_finished(path):
            return path
    raise FileNotFoundError(
        f"no finished run in {root}/small or {root}/demo; {_found(root)}. `{DEMO}` trains "
        f"one into {root}/demo (about 6 minutes), `{TRAIN_SMALL}` the full small model (about "
        "23 minutes)")


def workdir(args: argparse.Namespace) -> str:
    """``--workdir`` if given (checked), else :func:`default_workdir` (announced on stderr).

    Raises:
      FileNotFoundError: the workdir holds no model; the message says what does.
    """
    if args.workdir is None:
        path = default_workdir()
        status(f"using the model in {path}")
        return path
    return require_workdir(args.workdir)


def require_workdir(path: str, command: str = "ec2moe train --workdir") -> str:
    """``path`` if it holds a trained model.

    Raises:
      FileNotFoundError: it does not; the message names ``command`` and the trained workdirs
        found under ``runs/``.
    """
    if not _is_trained(os.path.expanduser(path)):
        raise FileNotFoundError(
            f"{path!r} holds no trained model (no config.json); `{command} {path}` trains one; "
            f"{_found(RUNS)}")
    return path


CALIBRATION = os.path.join(RESULTS, "calibration_cpu.json")
PIPELINE_CALIBRATION = os.path.join(RESULTS, "pipeline_calibration.json")
CODEC_SWEEP = os.path.join(RESULTS, "codec_sweep.json")


def add_calibration_arg(p: argparse.ArgumentParser) -> None:
    """``--calibration``: this CPU's stage-time calibration file."""
    p.add_argument("--calibration", default=CALIBRATION,
                   help="this CPU's stage-time calibration (`ec2moe calibrate` writes it)")


def add_codec_sweep_arg(p: argparse.ArgumentParser) -> None:
    """``--codec-sweep``: the measured codec sweep the scheduler chooses codecs from."""
    p.add_argument("--codec-sweep", default=CODEC_SWEEP,
                   help="measured codec quality (`ec2moe codec-sweep` writes it): the codecs the "
                        "scheduler may choose")


def add_scheduler_inputs(p: argparse.ArgumentParser) -> None:
    """The files the scheduler plans with: this CPU's calibrations and the codec sweep."""
    add_calibration_arg(p)
    p.add_argument("--pipeline-calibration", default=None, metavar="PATH",
                   help=f"per-submesh refit of the calibration (`ec2moe pipeline-calibration` "
                        f"writes it; default: {PIPELINE_CALIBRATION} if it exists, else the "
                        "single-device calibration for both submeshes)")
    add_codec_sweep_arg(p)


def pipeline_calibration(args: argparse.Namespace) -> str | None:
    """``--pipeline-calibration``, else the default file if it exists, else None."""
    if args.pipeline_calibration is not None:
        return args.pipeline_calibration
    if os.path.isfile(PIPELINE_CALIBRATION):
        return PIPELINE_CALIBRATION
    status(f"no {PIPELINE_CALIBRATION}: the single-device calibration stands for both submeshes")
    return None


def workdir_help(default: str | None = None) -> str:
    if default is None:
        return ("trained model (default: runs/small if it holds a finished run, else runs/demo, "
                f"which `{DEMO}` trains)")
    return f"trained model (`{TRAIN_SMALL}` trains runs/small)"
