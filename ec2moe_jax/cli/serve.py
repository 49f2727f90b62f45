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
2-core CPU) unless --warm names it."""

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
    p.add_argument("--batch-wait-ms", type=float, default=3.0,
                   help="how long a decode step may wait for the other sessions of its batch")
    p.add_argument("--max-score-batch", type=int, default=4, help="rows per scoring request")
    p.add_argument("--devices", type=int, default=None,
                   help="devices of the server's mesh (default: 6 fake CPU devices on a CPU, "
                        "every device on an accelerator)")
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
    p.set_defaults(handler=serve, needs_devices=False)

    b = _common.add_parser(sub, "bench-serving", help="benchmark the server with real clients",
                           description=_BENCH)
    b.add_argument("--workdir", default=None, help=_common.workdir_help())
    b.add_argument("--out", default="results/serving.json", help="JSON to write")
    b.add_argument("--plot", default="results/serving.png", help="PNG to write ('' for none)")
    b.add_argument("--clients", default="1,2,4,8,16", help="client process counts")
    b.add_argument("--tokens", type=int, default=32, help="new tokens per client")
    b.add_argument("--quick", action="store_true",
                   help="1,2,8 clients, one link, 16 tokens: a smoke run of a few minutes")
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
        ready_file=args.ready_file)


def bench_serving(args: argparse.Namespace) -> dict:
    from ec2moe_jax.bench.serving import run

    clients = [1, 2, 8] if args.quick else [int(c) for c in args.clients.split(",")]
    return run(_common.workdir(args), clients=clients, tokens=16 if args.quick else args.tokens,
               quick=args.quick, out=args.out, plot=args.plot or None,
               command=_common.command_line("bench-serving", args.argv))
