"""``ec2moe serve`` (the cloud server of a trained workdir) and ``ec2moe bench-serving``
(real client processes against one server through a shaping relay)."""

from __future__ import annotations

import argparse
import os

from ec2moe_jax.cli import _common

_SERVE = """\
Serve the cloud side of a trained model over gRPC: layers [s, L) and the head for any split s
a client's session asks for, with continuous batching (decode steps of live sessions run as
one batched step), bounded KV slots (RESOURCE_EXHAUSTED beyond --slots), per-session TTL,
keepalive, health checking (grpc.health.v1), a Stats RPC and Prometheus metrics
(--metrics-port). Clients: `ec2moe generate --cloud HOST:PORT --plan ...` or
ec2moe_jax.serving.client.EndClient. Binds 127.0.0.1 unless --host says otherwise; a
non-loopback address needs --allow-remote plus --auth-token-file and/or --tls-cert/--tls-key.
Prints "listening on HOST:PORT" on stdout once ready; stops on Ctrl-C or SIGTERM.

Loading takes seconds; each (split, codec) compiles on first use (seconds per batch size on a
2-core CPU) unless --warm names it.

--num-processes N runs one cloud as N processes on jax.distributed (the experts sharded
across them; process 0 serves gRPC and broadcasts each batch to the others): without
--process-id on this machine (a launcher that restarts all N when one dies), or one command
per host with --process-id and --coordinator."""

_BENCH = """\
Real processes on this machine: one `ec2moe serve` process, 1..16 end client processes
(each its own JAX runtime) connecting through an in-process asyncio relay that emulates the
link (one-way delay and a bandwidth cap). For each link setting and plan (cloud-only and the
scheduler's plan) and client count: aggregate decode tokens/s, TTFT and TPOT p50/p99, bytes
per token measured at the relay's sockets, the server's batch occupancy, and the
discrete-event simulator's prediction of the mean latency for the same run. Writes JSON and a
PNG. Everything is measured on this CPU (both sides share its cores) except the link's delay
and rate, which the relay emulates. Takes about 15-25 minutes on a 2-core CPU with the tiny
config (--quick: a few minutes)."""


def register(sub) -> None:
    p = _common.add_parser(sub, "serve", help="serve the cloud side over gRPC",
                           description=_SERVE)
    p.add_argument("--workdir", default=None, help=_common.workdir_help())
    p.add_argument("--host", default="127.0.0.1", help="bind address")
    p.add_argument("--port", type=int, default=50051, help="port (0: a free one)")
    p.add_argument("--slots", type=int, default=8, help="sessions (KV cache rows) held at once")
    p.add_argument("--ttl", type=float, default=30.0,
                   help="seconds without a request after which a session's slot is freed")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="how long a decode step may wait for the other sessions of its batch "
                        "(0: none; steps arriving during a step join the next one)")
    p.add_argument("--max-score-batch", type=int, default=4, help="rows per scoring request")
    p.add_argument("--cache-len", type=int, default=None,
                   help="positions a session may hold, prompt included (default: the model's "
                        "max_seq_len); shorter keeps batched steps cheap")
    p.add_argument("--devices", type=int, default=None,
                   help="devices of the server's mesh (default: 6 fake CPU devices on a CPU, "
                        "every device on an accelerator); with --num-processes, per process")
    p.add_argument("--expert-shards", type=int, default=None,
                   help="size of the mesh's 'expert' axis (default 2 if it divides --devices)")
    p.add_argument("--allow-remote", action="store_true",
                   help="permit a non-loopback --host (needs --auth-token-file or TLS)")
    p.add_argument("--auth-token-file", default=None,
                   help="file holding the shared token every call must carry")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (TLS)")
    p.add_argument("--tls-key", default=None, help="PEM private key (TLS)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (0: a free one)")
    p.add_argument("--warm", default="",
                   help="compile these split:codec groups before listening, e.g. "
                        "0:bf16,1:int8-r64")
    p.add_argument("--warm-prompt", type=int, default=0,
                   help="with --warm, also compile the prefill of prompts this long")
    p.add_argument("--ready-file", default=None,
                   help="write the bound port to this file once listening (for scripts)")
    d = p.add_argument_group(
        "a cloud of several processes (jax.distributed; the expert axis spans them)")
    d.add_argument("--num-processes", type=int, default=1,
                   help="processes of the cloud (1: this process alone, no jax.distributed); "
                        "without --process-id, this command launches all of them on this "
                        "machine (each with --devices fake CPU devices) and restarts them "
                        "together when one dies")
    d.add_argument("--process-id", type=int, default=None,
                   help="this process's index in a cloud of --num-processes (multi-host: run "
                        "the command once per host with its own id; process 0 serves gRPC)")
    d.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's jax.distributed coordinator address, the same on every "
                        "process (needed with --process-id; the local launcher picks one)")
    d.add_argument("--launcher-status", default=None, metavar="FILE",
                   help="local launcher: keep its state (restarts, exits, outage seconds) in "
                        "this JSON file")
    p.set_defaults(handler=serve, needs_devices=False)

    b = _common.add_parser(sub, "bench-serving", help="benchmark the server with real clients",
                           description=_BENCH)
    b.add_argument("--workdir", default=None, help=_common.workdir_help())
    b.add_argument("--out", default="results/serving.json", help="JSON to write")
    b.add_argument("--plot", default="results/serving.png", help="PNG to write ('' for none)")
    b.add_argument("--clients", default="1,2,4,8,16", help="client process counts")
    b.add_argument("--tokens", type=int, default=64, help="new tokens per client")
    b.add_argument("--quick", action="store_true",
                   help="1,2,8 clients, one link, 16 tokens: a smoke run of a few minutes")
    b.add_argument("--random-init", default=None, metavar="CONFIG",
                   help="benchmark CONFIG with random parameters instead of a trained workdir "
                        "(created once in runs/serving-CONFIG; speed does not depend on "
                        "training)")
    b.add_argument("--server-devices", type=int, default=1,
                   help="devices of the server's mesh (fake CPU devices only split this CPU's "
                        "cores)")
    _common.add_scheduler_inputs(b)
    b.set_defaults(handler=bench_serving, needs_devices=False)


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FileNotFoundError(f"{what} {path!r}: {e.strerror}") from None


def _warm(text: str) -> list[tuple[int, str]]:
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        split, _, codec = item.partition(":")
        if not split.isdigit():
            raise ValueError(f"--warm item {item!r} must be SPLIT:CODEC, e.g. 1:int8-r64")
        out.append((int(split), codec or "bf16"))
    return out


def serve(args: argparse.Namespace) -> None:
    if args.num_processes < 1:
        raise ValueError(f"--num-processes {args.num_processes} must be >= 1")
    if args.num_processes > 1 and args.process_id is None:
        from ec2moe_jax.serving.distributed import Launcher

        rc = Launcher(args.argv, args.num_processes, port=args.port,
                      ready_file=args.ready_file, status_file=args.launcher_status).run()
        if rc:  # the launcher gave up and said why
            raise SystemExit(rc)
        return None
    if args.process_id is not None and args.coordinator is None:
        raise ValueError("--process-id needs --coordinator HOST:PORT (process 0's address, "
                         "the same on every process)")
    # The mesh is this process's devices: on a CPU, fake ones, set before JAX starts.
    if args.devices is not None:
        os.environ["JAX_NUM_CPU_DEVICES"] = str(args.devices)
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", "6")
    _common.needs_fake_devices()
    from ec2moe_jax.serving.launch import serve as run
    from ec2moe_jax.serving.server import ServeOptions

    token = _read(args.auth_token_file, "--auth-token-file")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    tls = None if args.tls_cert is None else (_read(args.tls_cert, "--tls-cert"),
                                              _read(args.tls_key, "--tls-key"))
    options = ServeOptions(
        host=args.host, port=args.port, slots=args.slots, ttl_s=args.ttl,
        batch_wait_s=args.batch_wait_ms / 1e3, max_score_batch=args.max_score_batch,
        token=None if token is None else token.decode().strip(), tls=tls,
        allow_remote=args.allow_remote, metrics_port=args.metrics_port)
    run(_common.workdir(args), options, devices=args.devices,
        expert_shards=args.expert_shards, warm=_warm(args.warm), warm_prompt=args.warm_prompt,
        ready_file=args.ready_file, cache_len=args.cache_len,
        num_processes=args.num_processes, process_id=args.process_id or 0,
        coordinator=args.coordinator)
    return None


def bench_serving(args: argparse.Namespace) -> dict:
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", "2")  # this process only plans and relays
    from ec2moe_jax.bench.serving import random_workdir, run

    clients = [1, 2, 8] if args.quick else [int(c) for c in args.clients.split(",")]
    workdir = (_common.workdir(args) if args.random_init is None else
               random_workdir(args.random_init,
                              os.path.join(_common.RUNS, f"serving-{args.random_init}")))
    inputs = {"calibration": args.calibration, "codec_sweep": args.codec_sweep,
              "pipeline_calibration": _common.pipeline_calibration(args)}
    return run(workdir, clients=clients, tokens=16 if args.quick else args.tokens,
               quick=args.quick, out=args.out, plot=args.plot or None,
               command=_common.command_line("bench-serving", args.argv), inputs=inputs,
               server_devices=args.server_devices)


def add_cloud_args(g: argparse.ArgumentParser) -> None:
    """``ec2moe generate``'s flags for a remote cloud (``--cloud HOST:PORT``)."""
    g.add_argument("--cloud", default=None, metavar="HOST:PORT",
                   help="run the cloud side on an `ec2moe serve` server (real gRPC): the end "
                        "layers and the codec run here; --plan (default cloud-only) chooses "
                        "the split")
    g.add_argument("--cloud-token-file", default=None,
                   help="with --cloud: file holding the server's shared token")
    g.add_argument("--cloud-ca", default=None,
                   help="with --cloud: PEM of the CA of the server's TLS certificate")
    g.add_argument("--privacy", action="store_true",
                   help="with --cloud: refuse plans that send raw token ids (split 0)")
    g.add_argument("--replan-every", type=int, default=0,
                   help="with --cloud and --plan ec2moe: re-plan on the measured link and the "
                        "server's load every N tokens (0: never); a new plan opens a new "
                        "session")


def generate_remote(args: argparse.Namespace) -> str:
    """``ec2moe generate --cloud``: streams the text as it arrives, then one JSON line of
    what was measured (TTFT, TPOT, bytes, reconnects) on stderr."""
    import json
    import time

    _common.needs_fake_devices()  # the end mesh: the config's mesh.end_devices
    from ec2moe_jax.cli.infer import _new_tokens, _prompt_ids, _resolve_plan, describe_plan
    from ec2moe_jax.data import ByteTokenizer
    from ec2moe_jax.pipeline.plans import baseline
    from ec2moe_jax.serving.client import connect
    from ec2moe_jax.training import load_run

    workdir = _common.workdir(args)
    run = load_run(workdir)
    cfg = run[0].cfg.model
    ids = _prompt_ids(args, cfg.vocab_size)
    n = _new_tokens(args.max_new_tokens, len(ids), cfg.max_seq_len)
    plan = (baseline("cloud-only", cfg) if args.plan is None else
            _resolve_plan(args, cfg, run[3], prompt_tokens=len(ids), gen_tokens=n))
    _common.status(f"plan {plan.name}: {describe_plan(plan.to_json(), cfg.moe.num_experts)}; "
                   f"cloud at {args.cloud}")
    token = _read(args.cloud_token_file, "--cloud-token-file")
    client = connect(args.cloud, workdir, plan, temperature=args.temperature,
                     token=None if token is None else token.decode().strip(),
                     tls_root=_read(args.cloud_ca, "--cloud-ca"), privacy=args.privacy,
                     seed=args.seed, run=run)
    client.warm_up(len(ids))
    replan = (_replanner(args, workdir, cfg, run, len(ids), n) if args.replan_every
              else None)
    tok, times = ByteTokenizer(), []
    ids_out = args.prompt_ids is not None
    t0 = time.perf_counter()

    def on_token(t: int) -> None:
        times.append(time.perf_counter() - t0)
        if ids_out:
            print(("," if len(times) > 1 else "") + str(t), end="", flush=True)
        else:
            print(("" if len(times) > 1 else _common.printable(args.prompt)) + tok.decode([t]),
                  end="", flush=True)

    with client:
        new = client.generate(ids, n, on_token, replan=replan,
                              replan_every=max(args.replan_every, 1))
    print()
    s = client.stats
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    _common.status(json.dumps({
        "ttft_s": times[0], "tpot_s": tpot, "tokens": len(new), "bytes_up": s.bytes_up,
        "bytes_down": s.bytes_down, "reconnects": s.reconnects, "rtt_s": s.rtt_s,
        "method": "measured: real gRPC to the server process (protobuf bytes counted here)"}))
    if ids_out:
        return ",".join(str(i) for i in new)
    return _common.printable(args.prompt) + tok.decode(new)


def _replanner(args, workdir: str, cfg, run, prompt_tokens: int, gen_tokens: int):
    """The ``replan`` hook of :meth:`EndClient.generate`: :class:`LivePlanner` on the client's
    measured link and the server's Stats; a new plan switches the client (new session)."""
    if args.plan != "ec2moe":
        raise ValueError("--replan-every needs --plan ec2moe (the scheduler's plan); a fixed "
                         f"plan ({args.plan!r}) has nothing to re-plan")
    from ec2moe_jax.cli.infer import describe_plan
    from ec2moe_jax.pipeline import runtime
    from ec2moe_jax.pipeline.plans import instance
    from ec2moe_jax.profiles import device, link
    from ec2moe_jax.scheduler import codec_options, this_cpu
    from ec2moe_jax.serving.replan import LivePlanner

    dev, cal, cloud_cal = this_cpu(cfg, args.calibration, _common.pipeline_calibration(args))
    if args.end_device != "this-cpu":
        dev = device(args.end_device)
    template = instance(cfg, run[3], dev, link(args.link), cal, prompt_tokens=prompt_tokens,
                        gen_tokens=gen_tokens, cloud_cal=cloud_cal,
                        codecs=codec_options(cfg.d_model, args.codec_sweep))
    if args.privacy:
        template = template.replace(min_end_layers=template.min_end_layers * 0 + 1)
    planner = LivePlanner(cfg, template)

    def replan(client) -> bool:
        s = client.stats
        new = planner.update(s.rtt_s, s.up_bps, client.server_stats().queue * s.compute_s)
        if new is None:
            return False
        _common.status(f"re-planned: {describe_plan(new.to_json(), cfg.moe.num_experts)}")
        if new.split == cfg.num_layers:  # nothing left to serve; this command needs a server
            _common.status("the new plan is end-only: this generation stays on the server; "
                           "`ec2moe generate --plan end-only` runs it here alone")
            return False
        setup, params, splits, freq = run
        stages, _ = runtime.prepare(setup.model, params, new, client.stages.end_mesh, None,
                                    frequencies=freq, workdir=workdir,
                                    train_tokens=splits.train,
                                    temperature=args.temperature, side="end")
        codec, _ = runtime.link_codec(setup.model, params, new, workdir=workdir,
                                      train_tokens=splits.train)
        client.switch(stages, codec)
        return True

    return replan
