"""``ec2moe api``: the OpenAI-compatible HTTP API (and its page) of a trained workdir, in front
of the end client of an ``ec2moe serve`` cloud (``--cloud``) or of the whole model here."""

from __future__ import annotations

import argparse
import os

from ec2moe_jax.cli import _common

_API = """\
Serve an OpenAI-compatible HTTP API: GET /v1/models, POST /v1/completions and
/v1/chat/completions (stream: true as server-sent events; max_tokens, temperature, stop,
seed; usage counts), a page at / (prompt box with streamed output, a live panel of the plan,
link estimate, queue and TTFT/TPOT) and its JSON at GET /ec2moe/status. With --cloud the end
layers and the codec run here and the rest on an `ec2moe serve` server (--plan, default
cloud-only; --replan-every re-plans on the measured link); without it the whole model runs in
this process. At most --queue requests are admitted at once (429 beyond); a client that
disconnects cancels its generation. Every response carries an "ec2moe" object: plan, bytes
on the link, TTFT/TPOT (measured here). Binds 127.0.0.1 unless --host and --allow-remote say
otherwise; prints "listening on http://HOST:PORT" once ready; stops on Ctrl-C or SIGTERM.

Loading and compiling the first request's shapes take seconds on a 2-core CPU (done before
listening unless --no-warm)."""

READY = "listening on"


def register(sub) -> None:
    from ec2moe_jax.cli import infer, serve

    p = _common.add_parser(sub, "api", help="OpenAI-compatible HTTP API with a page",
                           description=_API)
    p.add_argument("--workdir", default=None, help=_common.workdir_help())
    p.add_argument("--hf", default=None,
                   help="serve a Hugging Face folder in this process instead of a workdir "
                        "(its tokenizer.json; chat completions through its chat template)")
    p.add_argument("--host", default="127.0.0.1", help="bind address")
    p.add_argument("--port", type=int, default=8000, help="port (0: a free one)")
    p.add_argument("--allow-remote", action="store_true",
                   help="permit a non-loopback --host (the API has no authentication)")
    p.add_argument("--queue", type=int, default=8,
                   help="requests admitted at once (running + waiting); more get 429")
    p.add_argument("--workers", type=int, default=1,
                   help="with --cloud: end clients (concurrent generations; the server "
                        "batches them); the local model runs one at a time")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the workdir's folder name)")
    p.add_argument("--plan", default=None,
                   help="with --cloud: the plan (as `ec2moe generate --plan`; default "
                        "cloud-only)")
    p.add_argument("--no-warm", action="store_true",
                   help="listen before compiling a first request's shapes")
    p.add_argument("--ready-file", default=None,
                   help="write the bound port to this file once listening (for scripts)")
    infer._pipeline_args(p)
    serve.add_cloud_args(p)
    p.set_defaults(handler=api, needs_devices=False)


def _hf_backend(folder: str, name: str):
    """The whole imported model of ``folder`` here, with its tokenizer and chat template."""
    from ec2moe_jax.models import load_hf
    from ec2moe_jax.models.hf_tokenizer import load_tokenizer
    from ec2moe_jax.serving.api_backends import HFText, LocalBackend

    _common.status(f"loading {folder}")
    model, params = load_hf(folder)
    tok = load_tokenizer(folder)
    text = HFText(tok)
    cfg = model.cfg
    plan = {"split": cfg.num_layers, "layers": cfg.num_layers,
            "resident": [cfg.moe.num_experts] * cfg.num_layers, "codec": "none",
            "text": "the whole imported model in this process (no cloud)"}
    return LocalBackend(model, params, name, text, plan, eos_ids=tok.eos_ids,
                        chat_template=None if tok.chat_template is None else text.chat)


def _backend(args: argparse.Namespace, workdir: str, name: str):
    """The backend of ``args``: end clients of ``--cloud``, or the whole model here."""
    from ec2moe_jax.cli.infer import describe_plan
    from ec2moe_jax.data import ByteTokenizer
    from ec2moe_jax.serving.api_backends import LocalBackend, RemoteBackend

    if args.hf is not None:
        if args.cloud is not None or args.plan is not None:
            raise ValueError("--hf runs the imported model in this process; for --cloud or "
                             "--plan convert it first (`ec2moe convert-hf --hf FOLDER "
                             "--workdir runs/imported`) and pass --workdir")
        return _hf_backend(args.hf, name)
    if args.cloud is None:
        if args.plan is not None or args.replan_every:
            raise ValueError("--plan and --replan-every need --cloud HOST:PORT (without it "
                             "the whole model runs in this process)")
        from ec2moe_jax.training import load_params

        setup, params = load_params(workdir)
        cfg = setup.cfg.model
        plan = {"split": cfg.num_layers, "layers": cfg.num_layers,
                "resident": [cfg.moe.num_experts] * cfg.num_layers, "codec": "none",
                "text": "the whole model in this process (no cloud)"}
        return LocalBackend(setup.model, params, name, ByteTokenizer(), plan)
    from ec2moe_jax.cli import serve
    from ec2moe_jax.cli.infer import _resolve_plan
    from ec2moe_jax.pipeline.plans import baseline
    from ec2moe_jax.serving.client import connect
    from ec2moe_jax.training import load_run

    run = load_run(workdir)
    cfg = run[0].cfg.model
    probe = max(1, cfg.max_seq_len // 4)  # the scheduler's workload: a typical request
    plan = (baseline("cloud-only", cfg) if args.plan is None else
            _resolve_plan(args, cfg, run[3], prompt_tokens=probe, gen_tokens=probe))
    words = describe_plan(plan.to_json(), cfg.moe.num_experts)
    if plan.split == cfg.num_layers:
        raise ValueError(f"--plan {args.plan} is end-only here ({words}): nothing would run "
                         f"on the cloud at {args.cloud}; drop --cloud to serve the whole "
                         "model in this process, or give --plan cloud-only or a plan JSON "
                         "with split < num_layers (for --plan ec2moe, a weaker "
                         "--end-device or another --link may move layers to the cloud)")
    _common.status(f"plan {plan.name}: {words}; cloud at {args.cloud}")
    token = serve._read(args.cloud_token_file, "--cloud-token-file")
    clients = [connect(args.cloud, workdir, plan, token=None if token is None else
                       token.decode().strip(), tls_root=serve._read(args.cloud_ca, "--cloud-ca"),
                       privacy=args.privacy, run=run) for _ in range(args.workers)]
    replan = (serve._replanner(args, workdir, cfg, run, probe, probe) if args.replan_every
              else None)
    return RemoteBackend(clients, name, ByteTokenizer(), address=args.cloud,
                         describe=lambda p: describe_plan(p, cfg.moe.num_experts),
                         replan=replan, replan_every=max(args.replan_every, 1))


def _warm(backend) -> None:
    """One short greedy generation, so the first request does not pay for compilation."""
    from ec2moe_jax.serving.openai_api import Sampling

    ids = [int(i) for i in backend.tokenizer.encode("ROMEO:")][:backend.max_seq_len - 2]
    backend.generate(ids or [0], 2, Sampling(0.0, 1.0, None), lambda _: None, {})


def api(args: argparse.Namespace) -> None:
    import ipaddress

    if args.queue < 1 or args.workers < 1:
        raise ValueError(f"--queue {args.queue} and --workers {args.workers} must be >= 1")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not args.allow_remote:
        raise ValueError(f"--host {args.host} is not a loopback address and the API has no "
                         "authentication: add --allow-remote to expose it deliberately")
    if args.cloud is not None:
        _common.needs_fake_devices()  # the end mesh: the config's mesh.end_devices
    workdir = args.hf if args.hf is not None else _common.workdir(args)
    name = args.model_name or os.path.basename(os.path.normpath(workdir))
    backend = _backend(args, workdir, name)
    if not args.no_warm:
        _common.status("compiling a first request's shapes")
        _warm(backend)
    from ec2moe_jax.serving.openai_api import create_app, run_http

    app = create_app(backend, queue_size=args.queue,
                     info={"workdir": workdir, "queue_size": args.queue})
    run_http(app, args.host, args.port, ready_file=args.ready_file)
