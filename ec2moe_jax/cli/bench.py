"""Benchmarks that write the committed results: ``ec2moe bench`` (the evaluation),
``codec-sweep``, ``hlggn-eval``, ``scheduler-report``, ``bench-scheduler``,
``bench-moe-layer``, ``bench-decode`` and ``bench-quality-memory``."""

from __future__ import annotations

import argparse
import json
import os

from ec2moe_jax.cli import _common

_R = _common.RESULTS

_BENCH = """\
The evaluation: EC2MoE against its ablations (no hardware-aware selection, masked top-k
instead of the group gate, no codec, static plan) and the baselines (cloud-only, end-only,
best single split) in 90 regimes (5 workloads x 2 cloud classes x 1/8/64 end devices x 3
bandwidths), a load sweep, a bandwidth sweep and a timeline through a bandwidth drop, all
simulated with the calibrated cost model; bits/char of every strategy's plans, measured
through the real pipeline on the trained small model; and the simulator validated against
real stage execution on this machine. Writes <out> (results/bench.json) and the .md and
.png next to it.

Time on a 2-core CPU: about 9 minutes with the quality cache in the workdir warm, roughly
15 minutes cold; --quick, a few minutes."""

_CODEC = """\
Codec rank sweep at a split point of the trained model: for each rank and latent width,
PCA of real boundary activations, then fine-tuning (backbone frozen, quantisation in the
loop), bits/char on held-out text and exact wire bytes per token. Writes <out>
(results/codec_sweep.json). About 18 minutes on a 2-core CPU for the default sweep."""

_HLGGN = """\
HL-GGN evaluation: for three device profiles (about 25%, 50% and 75% of the end layers'
experts resident), hardware-aware expert selection from routing statistics, group-gate
training (LM frozen), a residency-aware fine-tune, and bits/char, routing recall and gate
FLOPs on the held-out test split. Writes <out> (results/hlggn.json, one object per
profile). About half an hour on a 2-core CPU."""

_QUALITY_MEMORY = """\
Quality against end memory, measured: for end budgets of 10-100% of the end layers' bf16
expert bytes, which experts fit (bf16, int8 or int4 weight-only, exact bytes), the group
gate trained for them (LM frozen), and bits/char on the held-out test split, for the plain
LM and the residency-trained one (train.residency_prob), on small and small_fine. Points
are saved as they finish (an interrupted run resumes). Writes <out>
(results/quality_memory.json) and the .png next to it. About 20 minutes per model on a
2-core CPU."""

_SCHED_REPORT = """\
Scheduler report (simulated with the calibrated cost model): EC2MoE's plans against
cloud-only, end-only and the best split for single-pass and decoding workloads over 1-64
end devices and 1-100 Mbit/s, the heuristic against the exhaustive optimum on small random
instances, and re-planning under bandwidth changes. Writes <out> (results/scheduler.json)
and the plot (results/scheduler.png). About 1.5 minutes on a 2-core CPU."""

_SCHED_BENCH = """\
Scheduler decision time (measured): the median of jitted schedule() calls on a large
instance, for single-pass and decoding workloads, with a check that repeats compile
nothing. Writes <out> (results/scheduler_decision_time.json). Under a minute on a 2-core
CPU."""

_MOE_LAYER = """\
MoE layer forward vs a dense SwiGLU of equal FLOPs, for each dispatch implementation
(gather, einsum, ragged): GFLOP/s, tokens/s and the ratio to dense, medians over
interleaved rounds. Writes <out> (results/moe_layer.json). About a minute on a 2-core CPU
(ragged_dot is slow on CPU)."""

_DECODE = """\
Decoding speed, measured on this CPU: ours against transformers' generate on the same
random checkpoints (saved by transformers, loaded with load_hf): OLMoE-shaped (d=512, 4
layers, 16 experts top-4, vocab 4096) declaring 2,048 and 262,144 positions, and a
Qwen3-MoE-shaped one, at batch 1 and 8 (greedy, 32-token prompt, 64 new tokens, identical
tokens checked, medians of interleaved rounds); the small model's generate and the split
pipeline's decode step, this tree against the commit before the fast decode path (a
temporary git worktree); the bits/char cost of bf16 weights and caches on a small model
trained briefly. Writes <out> (results/decode.json).

Needs torch and transformers, which are not project dependencies; install torch FIRST
(a CPU wheel), then transformers:  pip install torch==2.13.0 && pip install transformers

Time on a 2-core CPU: about 15 minutes (with the bf16 model already trained)."""


def register(sub) -> None:
    b = _common.add_parser(sub, "bench", help="the evaluation (EC2MoE vs baselines, simulated)",
                           description=_BENCH, devices=True)
    b.add_argument("--workdir", default="runs/small", help=_common.workdir_help("runs/small"))
    b.add_argument("--out", default=os.path.join(_R, "bench.json"),
                   help="JSON path; the .md and .png take its stem")
    b.add_argument("--quick", action="store_true",
                   help="a 4-regime grid and no validation (a smoke test)")
    b.add_argument("--no-quality", action="store_true", help="skip the measured bits/char")
    b.add_argument("--no-validation", action="store_true",
                   help="skip the simulator's validation against real stage execution")
    b.add_argument("--gate-steps", type=int, default=0,
                   help="group-gate training steps for masks without a saved gate; 0: the "
                        "least-squares-initialised gate for every mask (about 10 s per mask; "
                        "training costs about 4 s per step)")
    b.add_argument("--quality-memory", default=os.path.join(_R, "quality_memory.json"),
                   help="ec2moe bench-quality-memory's results: the measured quality budget "
                        "('none': the routing-mass proxy, 90%% coverage per end layer)")
    b.add_argument("--quality-method", default="small:plain/int4/gate",
                   help="MODEL:LM/EXPERTS/ROUTER of those results the scheduler plans with; "
                        "the ends store experts in that format (use --workdir of that LM)")
    b.add_argument("--quality-budget", type=float, default=0.02,
                   help="largest relative bits/char increase of an end layer's experts")
    b.add_argument("--codec-budget", type=float, default=None,
                   help="largest relative bits/char increase of a codec (default: 0.01 with "
                        "the measured budget, so the two stay within 3%%; 0.02 with the proxy)")
    _common.add_calibration_arg(b)
    _common.add_codec_sweep_arg(b)
    b.set_defaults(handler=bench)

    c = _common.add_parser(sub, "codec-sweep", help="codec rank sweep at a split point",
                           description=_CODEC)
    c.add_argument("--workdir", default="runs/small", help=_common.workdir_help("runs/small"))
    c.add_argument("--split", type=int, default=None,
                   help="split point, in layers (default: num_layers // 2)")
    c.add_argument("--settings", default=None,
                   help="comma-separated rank:bits, e.g. 32:int8,112:int4 (default: the "
                        "sweep of the README table)")
    c.add_argument("--steps", type=int, default=150, help="fine-tuning steps per setting")
    c.add_argument("--eval-batches", type=int, default=40,
                   help="test batches (16 x 128 bytes) for bits/char")
    c.add_argument("--out", default=os.path.join(_R, "codec_sweep.json"), help="JSON path")
    c.set_defaults(handler=codec_sweep)

    h = _common.add_parser(sub, "hlggn-eval", help="HL-GGN table (selection + group gate)",
                           description=_HLGGN)
    h.add_argument("--workdir", default="runs/small", help=_common.workdir_help("runs/small"))
    h.add_argument("--end-layers", type=int, default=2, help="layers run on the end device")
    h.add_argument("--gate-steps", type=int, default=100, help="gate training steps")
    h.add_argument("--eval-batches", type=int, default=30,
                   help="test batches (16 x 128 bytes) for bits/char")
    h.add_argument("--adapt-steps", type=int, default=400,
                   help="residency-aware LM fine-tune steps for the adapted rows (0: skip)")
    h.add_argument("--out", default=os.path.join(_R, "hlggn.json"), help="JSON path")
    h.set_defaults(handler=hlggn_eval)

    r = _common.add_parser(sub, "scheduler-report", help="scheduler report (simulated)",
                           description=_SCHED_REPORT)
    _common.add_calibration_arg(r)
    _common.add_codec_sweep_arg(r)
    r.add_argument("--gap-instances", type=int, default=200,
                   help="random small instances for the heuristic-vs-optimum gap")
    r.add_argument("--routing-stats", default=None, metavar="WORKDIR",
                   help="also compare routing statistics measured through this trained model "
                        "(e.g. runs/small) with synthetic ones")
    r.add_argument("--plot", default=os.path.join(_R, "scheduler.png"),
                   help="PNG path ('' to skip)")
    r.add_argument("--out", default=os.path.join(_R, "scheduler.json"), help="JSON path")
    r.set_defaults(handler=scheduler_report)

    d = _common.add_parser(sub, "bench-scheduler", help="scheduler decision time (measured)",
                           description=_SCHED_BENCH)
    d.add_argument("--layers", type=int, default=32, help="model layers")
    d.add_argument("--experts", type=int, default=64, help="experts per MoE layer")
    d.add_argument("--devices", type=int, default=16, help="end devices")
    d.add_argument("--repeats", type=int, default=50, help="timed calls per workload")
    _common.add_codec_sweep_arg(d)
    d.add_argument("--out", default=os.path.join(_R, "scheduler_decision_time.json"),
                   help="JSON path")
    d.set_defaults(handler=bench_scheduler)

    m = _common.add_parser(sub, "bench-moe-layer", help="MoE layer vs dense (measured)",
                           description=_MOE_LAYER)
    m.add_argument("--tokens", type=int, default=4096, help="tokens per forward")
    m.add_argument("--dispatch", default="gather,einsum,ragged",
                   help="comma-separated dispatch implementations; the first is the fast path "
                        "the ratio to dense uses")
    m.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    m.add_argument("--out", default=os.path.join(_R, "moe_layer.json"), help="JSON path")
    m.set_defaults(handler=bench_moe_layer)

    q = _common.add_parser(sub, "bench-quality-memory",
                           help="bits/char against end memory per method (measured)",
                           description=_QUALITY_MEMORY)
    q.add_argument("--models", default="small=runs/small+runs/small-resident,"
                   "small_fine=runs/small-fine+runs/small-fine-adapted",
                   help="comma-separated NAME=PLAIN_WORKDIR[+RESIDENCY_WORKDIR]; a missing "
                        "workdir skips its variants")
    q.add_argument("--variants", default=None,
                   help="comma-separated lm/experts/router (default: the standard set)")
    q.add_argument("--fractions", default="0.1,0.25,0.5,0.75,1.0",
                   help="end expert budgets, fractions of the end layers' bf16 expert bytes")
    q.add_argument("--end-layers", type=int, default=2, help="layers on the end")
    q.add_argument("--gate-steps", type=int, default=100, help="group-gate training steps")
    q.add_argument("--eval-batches", type=int, default=60,
                   help="test batches of 16 x 128 bytes per bits/char figure")
    q.add_argument("--out", default=os.path.join(_R, "quality_memory.json"), help="JSON path")
    q.set_defaults(handler=bench_quality_memory)

    dd = _common.add_parser(sub, "bench-decode", help="decoding speed vs transformers (measured)",
                            description=_DECODE)
    dd.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    dd.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    dd.add_argument("--olmoe-ffn", type=int, default=256,
                    help="expert width of the OLMoE-shaped checkpoint (256: OLMoE-1B-7B's "
                         "1024/2048 ratio at d=512)")
    dd.add_argument("--no-before-after", action="store_true",
                    help="skip the comparison with the commit before the fast decode path")
    dd.add_argument("--quality-workdir", default="runs/decode-bf16",
                    help="where the small model for the bf16 bits/char cost is trained (resumed "
                         "if there)")
    dd.add_argument("--quality-steps", type=int, default=400,
                    help="training steps of that model (about 3 minutes on 2 cores)")
    dd.add_argument("--no-quality", action="store_true", help="skip the bf16 bits/char cost")
    dd.add_argument("--out", default=os.path.join(_R, "decode.json"), help="JSON path")
    dd.set_defaults(handler=bench_decode)


def bench(args: argparse.Namespace) -> dict:
    from ec2moe_jax.bench import evaluation, report

    needs_model = not (args.no_quality and args.no_validation)
    if needs_model:
        _common.require_workdir(args.workdir, "ec2moe train --config small --workdir")
    regimes = None
    if args.quick:
        regimes = evaluation.regimes(workloads=("score-128", "private-generate-128+32"),
                                     clouds=("t4",), devices=(1, 8), bandwidths=(20.0,))
    _common.status(f"simulating {len(regimes) if regimes else 90} regimes"
                   + (", measuring quality" if not args.no_quality else "")
                   + (", validating the simulator" if not (args.no_validation or args.quick)
                      else ""))
    budget = _quality_budget(args)
    record = report.run(args.workdir, calibration=args.calibration,
                        codec_sweep=args.codec_sweep, regimes=regimes,
                        quality=not args.no_quality,
                        validation=not (args.no_validation or args.quick),
                        gate_steps=args.gate_steps, budget=budget)
    record["command"] = _common.command_line("bench", args.argv)
    stem = os.path.splitext(args.out)[0]
    record = report.write(record, args.out, stem + ".md", stem + ".png")
    print(record["tables_markdown"])
    print(f"wrote {args.out}, {stem}.md, {stem}.png in {record['wall_seconds']:.0f} s")
    return record


def _quality_budget(args: argparse.Namespace) -> dict:
    """``Context.default``'s budget keywords from ``ec2moe bench``'s flags."""
    from ec2moe_jax.scheduler import ResidencyQuality

    measured = args.quality_memory != "none"
    if args.codec_budget is None:
        args.codec_budget = 0.01 if measured else 0.02
    for flag in ("quality_budget", "codec_budget"):
        if not 0 <= getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: a relative "
                             "bits/char increase in [0, 1)")
    budget = {"quality_budget": args.quality_budget, "codec_budget": args.codec_budget}
    if not measured:
        return budget
    model, sep, variant = args.quality_method.partition(":")
    if not sep:
        raise SystemExit(f"--quality-method {args.quality_method!r}: write MODEL:LM/EXPERTS/"
                         "ROUTER, e.g. small:plain/int4/gate")
    try:
        quality = ResidencyQuality.from_quality_memory(args.quality_memory, model, variant)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--quality-memory {args.quality_memory}: {e}") from None
    return {**budget, "quality": quality}


def _settings(text: str | None):
    from ec2moe_jax.bench.codec_sweep import DEFAULT_SETTINGS

    if not text:
        return DEFAULT_SETTINGS
    try:
        return tuple((int(r), b) for r, b in (s.split(":") for s in text.split(",")))
    except ValueError:
        raise ValueError(f"--settings {text!r} must be comma-separated rank:bits pairs, e.g. "
                         "32:int8,112:int4") from None


def codec_sweep(args: argparse.Namespace) -> dict:
    from ec2moe_jax.bench.codec_sweep import run

    _common.require_workdir(args.workdir, "ec2moe train --config small --workdir")
    settings = _settings(args.settings)
    _common.status(f"sweeping {len(settings)} codec settings ({args.steps} fine-tuning steps "
                   "each)")
    record = run(args.workdir, args.split, settings, finetune_steps=args.steps,
                 eval_batches=args.eval_batches)
    record["command"] = _common.command_line("codec-sweep", args.argv)
    _common.write_json(args.out, record)
    print(json.dumps({k: record[k] for k in ("baseline_bf16", "best_meeting_target",
                                             "closest_at_8x")}, indent=2))
    print(f"wrote {args.out}")
    return record


def hlggn_eval(args: argparse.Namespace) -> list[dict]:
    import jax

    from ec2moe_jax.bench.hlggn import run

    _common.require_workdir(args.workdir, "ec2moe train --config small --workdir")
    _common.status("selecting resident experts and training group gates for 3 profiles")
    rows = run(args.workdir, num_end_layers=args.end_layers, gate_steps=args.gate_steps,
               eval_batches=args.eval_batches, adapt_steps=args.adapt_steps)
    command = _common.command_line("hlggn-eval", args.argv)
    for row in rows:
        row["method"] = (f"measured on {jax.devices()[0].platform}, jax {jax.__version__}: "
                         f"bits/char on the first {args.eval_batches} batches of 16 disjoint "
                         "128-byte windows of the test split")
        row["command"] = command
    _common.write_json(args.out, rows)
    for r in rows:
        print(f"{r['profile']:>32}  resident {r['resident_fraction']:.2f}  "
              f"full {r['bits_per_char_full']:.3f}  masked {r['bits_per_char_masked_topk']:.3f}"
              f"  gate {r['bits_per_char_group_gate']:.3f}  recall {r['routing_recall_at_k']:.3f}"
              f"  flops {r['gate_flops_ratio']:.3f}")
    print(f"wrote {args.out}")
    return rows


def bench_quality_memory(args: argparse.Namespace) -> dict:
    import jax

    from ec2moe_jax.bench import quality_memory as qm
    from ec2moe_jax.bench.plots import plot_quality_memory
    from ec2moe_jax.files import read_json

    for flag in ("gate_steps", "eval_batches", "end_layers"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    try:
        variants = (qm.DEFAULT_VARIANTS if args.variants is None
                    else tuple(qm.Variant.parse(v) for v in args.variants.split(",")))
    except ValueError as e:
        raise SystemExit(f"--variants {args.variants!r}: {e}") from None
    try:
        fractions = tuple(float(f) for f in args.fractions.split(","))
    except ValueError:
        raise SystemExit(f"--fractions {args.fractions!r}: comma-separated numbers in (0, 1]"
                         ) from None
    if not all(0 < f <= 1 for f in fractions):
        raise SystemExit(f"--fractions {args.fractions!r}: each must lie in (0, 1]")
    models = {}
    for item in args.models.split(","):
        name, sep, dirs = item.partition("=")
        if not sep or not dirs:
            raise SystemExit(f"--models item {item!r}: write NAME=PLAIN_WORKDIR"
                             "[+RESIDENCY_WORKDIR]")
        plain, _, resident = dirs.partition("+")
        _common.require_workdir(plain, f"ec2moe train --config {name} --workdir")
        models[name] = {"plain": plain, "residency": resident or None}
    for name, workdirs in models.items():
        _common.status(f"{name}: {len(variants)} methods x {len(fractions)} budgets")
        qm.run_model(name, workdirs, args.out, variants=variants, fractions=fractions,
                     num_end_layers=args.end_layers, gate_steps=args.gate_steps,
                     eval_batches=args.eval_batches)
    record = read_json(args.out, what="quality-memory results")
    record["method"] = (
        f"measured on {jax.devices()[0].platform}, jax {jax.__version__}: bits/char on the "
        f"first {args.eval_batches} batches of 16 disjoint 128-byte windows of the test split;"
        f" the first {args.end_layers} layers on the end hold the experts that fit, the cloud "
        "every expert; codec lossless (float32 hidden state), so only the end's experts differ")
    record["command"] = _common.command_line("bench-quality-memory", args.argv)
    # Every invocation that added points, in order (a model may be measured in several).
    record["commands"] = [*record.get("commands", []), record["command"]]
    record = qm.finish(record)
    _common.write_json(args.out, record)
    png = plot_quality_memory(record, os.path.splitext(args.out)[0] + ".png")
    for name, best in record["best"].items():
        for f, p in best.items():
            print(f"{name:>10} @ {float(f):4.0%}: best {p['variant']:<22} "
                  f"{p['bits_per_char']:.4f} bits/char ({p['relative_increase']:+.1%})")
    print(f"wrote {args.out} and {png}")
    return record


def scheduler_report(args: argparse.Namespace) -> dict:
    from ec2moe_jax.bench.scheduler_report import run
    from ec2moe_jax.scheduler import load_calibration

    if args.routing_stats:
        _common.require_workdir(args.routing_stats)
    _common.status(f"scheduling the report's scenarios and {args.gap_instances} small "
                   "instances against their exhaustive optimum")
    record = run(load_calibration(args.calibration), args.gap_instances, args.routing_stats,
                 args.plot or None, codec_sweep=args.codec_sweep)
    record["command"] = _common.command_line("scheduler-report", args.argv)
    _common.write_json(args.out, record)
    print(json.dumps(record["gap_vs_optimum"], indent=2))
    print(f"wrote {args.out}")
    return record


def bench_scheduler(args: argparse.Namespace) -> dict:
    from ec2moe_jax.bench.scheduler_bench import run

    _common.status(f"timing {args.repeats} schedule() calls per workload")
    record = run(args.layers, args.experts, args.devices, args.repeats,
                 codec_sweep=args.codec_sweep)
    record["command"] = _common.command_line("bench-scheduler", args.argv)
    _common.write_json(args.out, record)
    print(json.dumps(record, indent=2))
    return record


def bench_moe_layer(args: argparse.Namespace) -> dict:
    from ec2moe_jax.bench.moe_layer import run

    dispatches = tuple(d.strip() for d in args.dispatch.split(",") if d.strip())
    _common.status(f"timing the MoE layer ({', '.join(dispatches)}) and the dense baseline, "
                   f"{args.rounds} rounds")
    record = run(tokens=args.tokens, dispatches=dispatches, rounds=args.rounds)
    record["command"] = _common.command_line("bench-moe-layer", args.argv)
    _common.write_json(args.out, record)
    print(json.dumps(record, indent=2))
    return record


def bench_decode(args: argparse.Namespace) -> dict:
    import ec2moe_jax
    from ec2moe_jax.bench.decode import run

    repo = os.path.dirname(os.path.dirname(os.path.abspath(ec2moe_jax.__file__)))
    if not args.no_before_after and not os.path.isdir(os.path.join(repo, ".git")):
        raise ValueError(f"the before/after comparison checks out an earlier commit of the git "
                         f"repository holding ec2moe_jax, but {repo!r} is not one; pass "
                         "--no-before-after")
    batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
    _common.status(f"decoding benchmark: {args.repeats} rounds at batches {batches}")
    record = run(repo=repo, olmoe_ffn=args.olmoe_ffn, repeats=args.repeats, batches=batches,
                 quality_workdir=None if args.no_quality else args.quality_workdir,
                 quality_steps=args.quality_steps, before_after=not args.no_before_after)
    record["command"] = _common.command_line("bench-decode", args.argv)
    _common.write_json(args.out, record)
    print(json.dumps(record, indent=2))
    return record
