"""``ec2moe demo`` (the README's main command: a real cloud server and end client processes
over an emulated link) and ``ec2moe demo-pipeline`` (the in-process plan comparison on 8 fake
CPU devices)."""

from __future__ import annotations

import argparse
import os

from ec2moe_jax.cli import _common
from ec2moe_jax.cli.infer import describe_plan

_DEMO = """\
The end-cloud demo with real processes: one `ec2moe serve` cloud server process and --clients
end client processes (each its own JAX runtime) on 127.0.0.1, every client connecting through
a relay that shapes the link (--link, default LTE-like: 20 Mbit/s, 50 ms RTT). Half the
clients run EC2MoE's plan under privacy (the scheduler's plan for this CPU as the end
device, its memory budget the fixed weights of every layer plus 10% of the experts
(--expert-fraction) and 4 MB, with at least one layer on the end: the hidden state crosses
the link through the plan's codec, never the token ids; the layers left to the cloud free
their share of the budget for the end layers' experts), the others cloud-only; they start
together and the server batches their decode steps. Client 0's text streams as it arrives;
then per client: TTFT, TPOT, bytes per token each way. Uses the fully trained small model in
runs/small if it holds a finished run, else trains the small config briefly into runs/demo
(once: its text is still rough). Writes <out>.json and <out>.png (results/demo.json,
results/demo.png), replacing the committed ones.

Measured: processes, sockets, this CPU (shared by the server and every client). Emulated: the
link's delay and rate. Time on a 2-core CPU: about 6 minutes the first time (measured on a
fresh clone: 300 training steps in 3.6 min, the corpus download, routing statistics,
compiling), under a minute once a model is trained."""

_PIPELINE = """\
The in-process end-cloud plan comparison on 8 fake CPU devices (end 2, cloud 6). Uses the
fully trained small model in runs/small if it holds a finished run, else trains the small
config briefly into runs/demo (once). Then it schedules EC2MoE for this CPU as the end
device over an emulated link, streams generated text through the split pipeline, and
compares EC2MoE's plan with cloud-only, end-only (drop / swap) and the best single split:
measured stage compute, the link emulated on a virtual clock, and the scheduler's
predictions. Writes <out>.json and
<out>.png (results/pipeline_demo.json, results/pipeline_demo.png).

Time on a 2-core CPU: about 6 minutes the first time (300 training steps at about 1 step/s
with 8 fake devices, the corpus download, compiling), about 1 minute once a model is
trained."""


def register(sub) -> None:
    p = _common.add_parser(sub, "demo", help="README command 1: server and client processes",
                           description=_DEMO, devices=True)  # 8 fake devices: training
    _workdir_args(p)
    p.add_argument("--prompt", default="ROMEO:\n",
                   help="prompt of the streamed client (its last 16 bytes are used)")
    p.add_argument("--link", default="lte",
                   help="emulated link preset: 3g, lte (20 Mbit/s, 50 ms RTT), wifi, 5g")
    p.add_argument("--clients", type=int, default=4, help="end client processes (2-16)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per client")
    p.add_argument("--expert-fraction", type=float, default=0.1,
                   help="share of the experts the end device's memory holds (EC2MoE's plan "
                        "is scheduled for that budget)")
    p.add_argument("--server-devices", type=int, default=1,
                   help="devices of the server's mesh (fake CPU devices split this CPU's "
                        "cores: 1 is fastest here)")
    _common.add_scheduler_inputs(p)
    p.add_argument("--out", default=os.path.join(_common.RESULTS, "demo"),
                   help="output path without extension (.json and .png are written)")
    p.set_defaults(handler=demo)

    q = _common.add_parser(sub, "demo-pipeline", help="in-process plan comparison (8 fake "
                           "devices)", description=_PIPELINE, devices=True)
    _workdir_args(q)
    q.add_argument("--prompt", default="ROMEO:\n",
                   help="prompt of the streamed request (its last 16 bytes are used)")
    q.add_argument("--link", default="lte",
                   help="emulated link preset: 3g, lte (20 Mbit/s, 50 ms RTT), wifi, 5g")
    q.add_argument("--temperature", type=_common.temperature, default=0.0,
                   help="sampling temperature; 0 = greedy")
    q.add_argument("--max-new-tokens", type=int, default=48,
                   help="tokens generated per request (after 16 prompt tokens)")
    _common.add_scheduler_inputs(q)
    q.add_argument("--out", default=os.path.join(_common.RESULTS, "pipeline_demo"),
                   help="output path without extension (.json and .png are written)")
    q.set_defaults(handler=demo_pipeline)


def _workdir_args(p) -> None:
    p.add_argument("--workdir", default=None,
                   help="trained model to use (default: runs/small if it holds a finished run, "
                        "else runs/demo, trained here if missing)")
    p.add_argument("--steps", type=int, default=300,
                   help="training steps when runs/demo is trained (300 keeps the whole demo "
                        "under 10 minutes on 2 cores)")


def _demo_workdir(args: argparse.Namespace) -> str:
    """``--workdir``, else a finished runs/small, else runs/demo (trained here once)."""
    if args.workdir is not None:
        return _common.require_workdir(args.workdir)
    full = os.path.join(_common.RUNS, "small")
    if os.path.isfile(os.path.join(full, "result.json")):
        _common.status(f"using the fully trained small model in {full}")
        return full
    workdir = os.path.join(_common.RUNS, "demo")
    if os.path.isfile(os.path.join(workdir, "result.json")):
        _common.status(f"using the briefly trained small model in {workdir}")
        return workdir
    from ec2moe_jax.config import load_config
    from ec2moe_jax.training import train

    steps = args.steps
    cfg = load_config("small").replace(train__steps=steps, train__warmup_steps=min(50, steps // 2),
                                       train__eval_every=steps, train__checkpoint_every=steps)
    _common.status(f"training the small config for {steps} steps into {workdir} (once; about "
                   f"{steps / 60:.0f} minutes here, corpus download included the first time)")
    r = train(cfg, workdir, final_eval_batches=16)
    _common.status(f"trained {r['steps']} steps in {r['wall_seconds']:.0f} s: "
                   f"{r['bits_per_char_test']:.3f} bits/char on the first 16 test batches "
                   f"(measured; `{_common.TRAIN_SMALL}` trains the full model)")
    return workdir


def demo(args: argparse.Namespace) -> dict:
    from ec2moe_jax.bench import serving_demo
    from ec2moe_jax.data import ByteTokenizer
    from ec2moe_jax.profiles import link

    link(args.link)  # bad options fail before any training
    serving_demo.check_options(clients=args.clients, tokens=args.max_new_tokens,
                               expert_fraction=args.expert_fraction)
    workdir = _demo_workdir(args)
    tok = ByteTokenizer()
    prompt = [int(t) for t in tok.encode(args.prompt)[-16:]]
    if not prompt:
        raise ValueError("--prompt is empty: give at least one character")
    started = []

    def on_token(t: int) -> None:
        if not started:
            started.append(True)
            print(f"client 0 (EC2MoE, private), streaming over the emulated {args.link} link:\n"
                  f"{_common.printable(args.prompt)}", end="")
        print(tok.decode([t]), end="", flush=True)

    def on_plan(name: str, plan: dict) -> None:
        from ec2moe_jax.training import load_workdir_config

        e = load_workdir_config(workdir).model.moe.num_experts
        print(f"{name}: {describe_plan(plan, e)}", flush=True)

    inputs = {"calibration": args.calibration, "codec_sweep": args.codec_sweep,
              "pipeline_calibration": _common.pipeline_calibration(args)}
    result = serving_demo.run_demo(workdir, link_name=args.link, prompt=prompt,
                                   tokens=args.max_new_tokens, clients=args.clients,
                                   inputs=inputs, expert_fraction=args.expert_fraction,
                                   on_plan=on_plan, on_token=on_token,
                                   on_stream_end=lambda: print(flush=True),
                                   server_devices=args.server_devices)
    print("-" * 72)
    for row in result["clients"]:
        row["text"] = tok.decode(row.pop("tokens"))
    _print_clients(result)
    _common.write_json(args.out + ".json", result)
    png = serving_demo.plot_demo(result, args.out + ".png")
    print(f"wrote {args.out}.json and {png}")
    return result


def _print_clients(result: dict) -> None:
    print(f"{'client':>6} {'plan':15} {'split':>5} {'codec':>9} {'TTFT ms':>8} "
          f"{'TPOT p50':>8} {'TPOT p99':>8} {'up B/tok':>8} {'down B/tok':>10} {'reconn':>6}")
    for r in result["clients"]:
        print(f"{r['client']:6d} {r['plan']:15} {r['split']:5d} {r['codec']:>9} "
              f"{r['ttft_s'] * 1e3:8.1f} {r['tpot_s']['p50'] * 1e3:8.1f} "
              f"{r['tpot_s']['p99'] * 1e3:8.1f} {r['bytes_up_per_token']:8.1f} "
              f"{r['bytes_down_per_token']:10.1f} {r['reconnects']:6d}")
    s = result["server"]
    occ = "-" if s["batch_occupancy"] is None else f"{s['batch_occupancy']:.2f}"
    print(f"measured: wall-clock at each client process, protobuf bytes; the server ran "
          f"{s['batched_steps']} batched decode steps, {occ} sessions per step on average "
          f"(median step {s['step_s_median'] * 1e3:.1f} ms); link emulated by the relay")


def demo_pipeline(args: argparse.Namespace) -> dict:
    from ec2moe_jax.bench import pipeline_demo
    from ec2moe_jax.bench.plots import plot_demo
    from ec2moe_jax.data import ByteTokenizer, prepare_splits
    from ec2moe_jax.profiles import link
    from ec2moe_jax.training import load_workdir_config

    profile = link(args.link)  # a bad preset fails before any training
    workdir = _demo_workdir(args)
    cfg = load_workdir_config(workdir)
    prompt_len = 16
    if prompt_len + args.max_new_tokens > cfg.model.max_seq_len:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} plus the {prompt_len}-token "
                         f"prompts exceeds the model's max_seq_len {cfg.model.max_seq_len}: at "
                         f"most {cfg.model.max_seq_len - prompt_len} new tokens fit")
    tok = ByteTokenizer()
    splits = prepare_splits(cfg.data)
    work = pipeline_demo.demo_workload(tok, splits, args.prompt, prompt_len=prompt_len,
                                       max_new_tokens=args.max_new_tokens,
                                       score_len=min(128, cfg.model.max_seq_len))

    started = []

    # Request 0 of the EC2MoE plan, as its tokens arrive; the header and prompt go out with
    # the first token, after the progress lines of scheduling and compiling (on stderr).
    def stream(ids, tokens, t):
        if ids[0] != 0:
            return
        if not started:
            started.append(True)
            print(f"EC2MoE, streaming request 0 (link {args.link}):\n{args.prompt}", end="")
        print(tok.decode([int(tokens[0])]), end="", flush=True)

    def on_plan(name: str, plan: dict) -> None:
        if name == "ec2moe":
            print(f"EC2MoE chose: {describe_plan(plan, cfg.model.moe.num_experts)}", flush=True)
        else:
            _common.status(f"baseline {name}: split {plan['split']}, codec {plan['codec']}")

    _common.status("scheduling EC2MoE, then running it and 4 baselines through the pipeline "
                   "(compiling each plan's stages first)")
    result = pipeline_demo.run_demo(workdir, profile, work, temperature=args.temperature,
                                    calibration=args.calibration,
                                    pipeline_calibration=_common.pipeline_calibration(args),
                                    codec_sweep=args.codec_sweep, on_token=stream,
                                    on_plan=on_plan)
    print("\n" + "-" * 60)
    for name, toks in result.pop("_tokens").items():
        result.setdefault("samples", {})[name] = tok.decode(toks[0].tolist())
    _print_table(result, cfg.model.moe.num_experts, len(work.prompts))
    _common.write_json(args.out + ".json", result)
    png = plot_demo(result, args.out + ".png")
    print(f"wrote {args.out}.json and {png}")
    return result


def _print_table(result: dict, num_experts: int, requests: int) -> None:
    print(f"{'plan':14} {'split':>5} {'codec':>9} {'mb':>3} {'gen lat':>8} {'TTFT':>7} "
          f"{'TPOT':>7} {'up B/req':>9} {'score lat':>9} {'bits/char':>9} {'pred gen':>8}")
    for r in result["rows"]:
        p, g, s = r["plan"], r["generate"], r["score"]
        print(f"{r['name']:14} {p['split']:5d} {p['codec']:>9} {p['micro_batch']:3d} "
              f"{g['latency_p50_s']:8.3f} {g['ttft_mean_s']:7.3f} {g['tpot_mean_s']:7.4f} "
              f"{g['bytes_up_per_request']:9.0f} {s['latency_p50_s']:9.3f} "
              f"{r['bits_per_char']:9.3f} {r['predicted_generate_s']:8.3f}")
    print(f"seconds; measured compute on this CPU + emulated link; the {requests} requests take "
          "turns on the same devices, so each latency holds the others' steps; 'pred gen' = "
          "scheduler cost model for one request alone (calibrated per submesh)")
    chosen = next(r for r in result["rows"] if r["name"] == "ec2moe")
    same = [r["name"] for r in result["rows"]
            if r["name"] != "ec2moe" and r.get("same_as") == "ec2moe"]
    print(f"EC2MoE chose: {describe_plan(chosen['plan'], num_experts)}"
          + (f" (the same plan as {', '.join(same)})" if same else ""))
