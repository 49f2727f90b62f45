"""``ec2moe generate``, ``ec2moe score`` and ``ec2moe eval``: use a trained model, whole or
split between the end and cloud submeshes (``--plan``)."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from ec2moe_jax.cli import _common

_PLAN_HELP = (
    "run through the end-cloud pipeline with this plan: ec2moe (the scheduler's plan for "
    "--end-device over --link), a baseline (cloud-only, end-only, end-only-drop, "
    "end-only-swap, best-split) or a plan JSON file (format below)")

_PLAN_JSON = """\
a plan JSON file holds one object, e.g. for 4 layers and 8 experts:
  {"split": 2, "resident": [6, 6, 8, 8], "codec": "int8-r64", "micro_batch": 1, "swap": false}
split: layers [0, split) run on the end (0: cloud-only); resident: experts kept per end layer
(one int for all; default all); codec: what crosses the link, bf16 (default), fp32 or
int8-r<R> / int4-r<R> / fp32-r<R> (low-rank latents, rank R); micro_batch: requests per
micro-batch (default 1); swap: read non-resident experts from storage instead of dropping
them (default false). The "plan" object of a score --json record is such a plan. Full
format: the docstring of ec2moe_jax.pipeline.plans.load_plan."""

_GENERATE = """\
Generate text from a trained model with its KV cache and print it. With --plan, the model
runs split between the end submesh (2 fake CPU devices) and the cloud submesh (6) over an
emulated link, streams the tokens and prints measured latency, time to first token, time
per output token and bytes on the link (stage compute measured on this CPU, the link
emulated). Writes nothing.

Time on a 2-core CPU: seconds for the plain path; with --plan, about a minute (compiling
the stages), plus a few minutes the first time a workdir is used (routing statistics,
cached in <workdir>/routing_stats.npz)."""

_SCORE = """\
Bits/char of --text through the end-cloud pipeline under --plan (end submesh: 2 fake CPU
devices, cloud: 6, link emulated), with measured latency and bytes on the link. Writes
nothing. About a minute on a 2-core CPU, plus a few minutes the first time a workdir is
used (routing statistics, cached in <workdir>/routing_stats.npz)."""

_EVAL = """\
Bits/char (bits per byte) of a held-out split of the model's own corpus, every byte scored
once, with sliding or disjoint windows. Writes nothing. The small model's test split takes
about 3 minutes on a 2-core CPU; the tiny model's, seconds."""


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--link", default="lte",
                   help="emulated link preset: 3g, lte (20 Mbit/s, 50 ms RTT), wifi, 5g")
    p.add_argument("--end-device", default="this-cpu",
                   help="end device the ec2moe plan is scheduled for: this-cpu or a device "
                        "preset name")
    _common.add_scheduler_inputs(p)


def register(sub) -> None:
    g = _common.add_parser(sub, "generate", help="generate text (whole model or --plan)",
                           description=_GENERATE, epilog=_PLAN_JSON)
    g.add_argument("--workdir", default=None, help=_common.workdir_help())
    g.add_argument("--hf", default=None,
                   help="generate straight from a Hugging Face folder instead of a workdir")
    g.add_argument("--prompt", default="ROMEO:\n",
                   help="prompt text (UTF-8 bytes are tokens; with --hf, the folder's "
                        "tokenizer.json and chat template)")
    g.add_argument("--prompt-ids", default=None,
                   help="comma-separated token ids instead of --prompt (imported models with "
                        "their own vocabulary); prints the new token ids instead of text")
    g.add_argument("--no-chat-template", action="store_true",
                   help="with --hf and --prompt: tokenize the prompt as plain text, without "
                        "the folder's chat template")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default: 300, or as many as the model's "
                        "max_seq_len leaves after the prompt; an explicit value that does not "
                        "fit is an error)")
    g.add_argument("--temperature", type=_common.temperature, default=0.0,
                   help="sampling temperature, a finite number >= 0; 0 = greedy")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--plan", default=None, help=_PLAN_HELP)
    _pipeline_args(g)
    from ec2moe_jax.cli import serve  # --cloud: the cloud side runs in an `ec2moe serve`

    serve.add_cloud_args(g)
    g.set_defaults(handler=generate, needs_devices=False)

    s = _common.add_parser(sub, "score", help="bits/char of a text through the pipeline",
                           description=_SCORE, devices=True, epilog=_PLAN_JSON)
    s.add_argument("--workdir", default=None, help=_common.workdir_help())
    s.add_argument("--text", default=None,
                   help="text to score, at most max_seq_len + 1 bytes (default: a line of "
                        "Romeo and Juliet, cut to fit the model)")
    s.add_argument("--plan", default="ec2moe", help=_PLAN_HELP)
    s.add_argument("--json", action="store_true", help="print one machine-readable JSON line")
    _pipeline_args(s)
    s.set_defaults(handler=score)

    e = _common.add_parser(sub, "eval", help="bits/char on a held-out split",
                           description=_EVAL)
    e.add_argument("--workdir", default=None, help=_common.workdir_help())
    e.add_argument("--split", default="test", choices=["val", "test"], help="held-out split")
    e.add_argument("--stride", type=int, default=-1,
                   help="window stride in bytes; -1: the config's train.eval_stride, 0: "
                        "disjoint windows")
    e.add_argument("--json", action="store_true", help="print one machine-readable JSON line")
    e.set_defaults(handler=evaluate)


def _prompt_ids(args: argparse.Namespace, vocab_size: int) -> list[int]:
    """The prompt as token ids, checked against the vocabulary: ``--prompt-ids``, or the bytes
    of ``--prompt`` as typed (bytes that are not valid UTF-8 included).

    Raises:
      ValueError: an empty prompt, a malformed id list or an id outside the vocabulary.
    """
    if args.prompt_ids is not None:
        try:
            ids = [int(i) for i in args.prompt_ids.split(",") if i.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids {args.prompt_ids!r} must be comma-separated "
                             "integers, e.g. 1,2,3") from None
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"--prompt-ids {bad} outside the model's vocabulary "
                             f"[0, {vocab_size})")
    else:
        ids = list(_common.argument_bytes(args.prompt))
        if ids and max(ids) >= vocab_size:
            raise ValueError(f"--prompt is read as bytes (ids up to {max(ids)}), but the "
                             f"model's vocabulary has {vocab_size} ids; give --prompt-ids")
    if not ids:
        raise ValueError("the prompt is empty; give --prompt text or --prompt-ids")
    return ids


DEFAULT_NEW_TOKENS = 300
DEFAULT_TEXT = ("ROMEO:\nBut soft, what light through yonder window breaks? It is the east, "
                "and Juliet is the sun.")


def _new_tokens(requested: int | None, prompt_len: int, max_seq_len: int) -> int:
    """``--max-new-tokens``, checked against the model; the default shrinks (announced) to
    what fits.

    Raises:
      ValueError: an explicit value that does not fit (never cut silently), or a prompt that
        leaves no room; the message names the numbers and the limit.
    """
    room = max_seq_len - prompt_len
    if room < 1:  # the prompt is the problem, whatever --max-new-tokens says
        raise ValueError(f"the prompt is {prompt_len} tokens long, but the model's "
                         f"max_seq_len {max_seq_len} must hold the prompt and at least one new "
                         f"token: shorten the prompt to at most {max_seq_len - 1} tokens")
    if requested is None:
        if room < DEFAULT_NEW_TOKENS:
            _common.status(f"generating {room} tokens: the most the model's max_seq_len "
                           f"{max_seq_len} leaves after the {prompt_len}-token prompt")
        return min(DEFAULT_NEW_TOKENS, room)
    if requested < 1:
        raise ValueError(f"--max-new-tokens {requested} must be >= 1")
    if requested > room:
        raise ValueError(
            f"--max-new-tokens {requested} plus the {prompt_len}-token prompt exceeds the "
            f"model's max_seq_len {max_seq_len}: at most {room} new tokens fit")
    return requested


def generate(args: argparse.Namespace) -> str:
    if args.cloud is not None:
        from ec2moe_jax.cli import serve

        return serve.generate_remote(args)
    if args.plan is not None:
        if args.hf:
            raise ValueError("--hf and --plan do not combine: convert the folder first "
                             "(`ec2moe convert-hf --hf FOLDER --workdir runs/imported`)")
        _common.needs_fake_devices()
        return _generate_split(args)
    import jax
    import jax.numpy as jnp

    from ec2moe_jax.data import ByteTokenizer
    from ec2moe_jax.models import generate as generate_lm

    if args.hf:
        from ec2moe_jax.models import load_hf

        _common.status(f"loading {args.hf}")
        model, params = load_hf(args.hf)
    else:
        from ec2moe_jax.training import load_params

        workdir = _common.workdir(args)
        setup, params = load_params(workdir)
        model = setup.model
    tok = None
    if args.hf and args.prompt_ids is None:  # a text prompt: the folder's own tokenizer
        from ec2moe_jax.models.hf_tokenizer import load_tokenizer

        tok = load_tokenizer(args.hf)
        ids = tok.encode(args.prompt, chat=not args.no_chat_template)
        if not ids or max(ids) >= model.cfg.vocab_size:
            raise ValueError(f"the tokenizer of {args.hf!r} gives {len(ids)} ids (largest "
                             f"{max(ids, default=None)}) for --prompt {args.prompt!r}; the "
                             f"model takes 1 or more ids below {model.cfg.vocab_size}")
    else:
        ids = _prompt_ids(args, model.cfg.vocab_size)
    n = _new_tokens(args.max_new_tokens, len(ids), model.cfg.max_seq_len)
    from ec2moe_jax.models import unstack_experts

    out = generate_lm(model, unstack_experts(params), jnp.asarray(ids, jnp.int32)[None], n,
                      temperature=args.temperature, rng=jax.random.key(args.seed))
    new = jax.device_get(out[0])
    if tok is not None:
        text = tok.decode(new)
    elif args.prompt_ids is not None:
        text = ",".join(str(int(i)) for i in new)
    else:
        text = _common.printable(args.prompt) + ByteTokenizer().decode(new)
    print(text)
    return text


def _resolve_plan(args, cfg, freq, *, prompt_tokens: int, gen_tokens: int):
    """The :class:`~ec2moe_jax.pipeline.plans.PipelinePlan` named by ``--plan``: a JSON
    path, a baseline name, or "ec2moe" (the scheduler's plan for ``--end-device`` over
    ``--link``, with this CPU's calibration from ``--calibration``)."""
    from ec2moe_jax.pipeline.plans import (
        BASELINES,
        baseline,
        instance,
        load_plan,
        scheduled_plans,
    )
    from ec2moe_jax.profiles import device, link
    from ec2moe_jax.scheduler import codec_options, this_cpu

    if os.path.exists(args.plan):
        return load_plan(args.plan, cfg)
    if args.plan not in (*BASELINES, "ec2moe"):
        raise ValueError(f"--plan {args.plan!r} is neither a file nor one of "
                         f"{[*BASELINES, 'ec2moe']}")
    if args.plan in ("cloud-only", "end-only"):  # fixed shapes: no scheduler needed
        return baseline(args.plan, cfg)
    dev, cal, cloud_cal = this_cpu(cfg, args.calibration, _common.pipeline_calibration(args))
    if args.end_device != "this-cpu":
        dev = device(args.end_device)
    inst = instance(cfg, freq, dev, link(args.link), cal, prompt_tokens=prompt_tokens,
                    gen_tokens=gen_tokens, codecs=codec_options(cfg.d_model, args.codec_sweep),
                    cloud_cal=cloud_cal)
    if args.plan == "ec2moe":
        return scheduled_plans(cfg, inst)["ec2moe"][0]
    return baseline(args.plan, cfg, inst)


def _run_split(args, workdir: str, tokens: np.ndarray, *, max_new_tokens: int = 0,
               on_token=None) -> dict:
    """Scores (``max_new_tokens == 0``: ``tokens`` [N, T + 1]) or generates after the
    prompts ``tokens`` [N, P] through the pipeline; returns the measured record with the
    outputs under ``"output"`` (log-probs [N, T] or tokens [N, G])."""
    from ec2moe_jax.pipeline import Channel, executor, runtime
    from ec2moe_jax.profiles import link
    from ec2moe_jax.sharding import split_end_cloud
    from ec2moe_jax.training import load_run

    profile = link(args.link)
    _common.status(f"loading {workdir} and its routing statistics")
    setup, params, splits, freq = load_run(workdir)
    cfg = setup.cfg.model
    gen = max_new_tokens > 0
    plan = _resolve_plan(args, cfg, freq, prompt_tokens=tokens.shape[1] - (not gen),
                         gen_tokens=max_new_tokens)
    _common.status(f"plan {plan.name}: {describe_plan(plan.to_json(), cfg.moe.num_experts)}")
    _common.status("compiling the end and cloud stages")
    stages, info = runtime.prepare(setup.model, params, plan, *split_end_cloud(setup.cfg.mesh),
                                   frequencies=freq, workdir=workdir,
                                   train_tokens=splits.train,
                                   temperature=getattr(args, "temperature", 0.0))
    kw = {"micro_batch": plan.micro_batch}
    channel = Channel.from_profile(profile)
    if gen:
        runtime.warm_up(stages, prompts=tokens, link=profile, **kw)
        out, rep = executor.generate(stages, tokens, max_new_tokens, channel=channel,
                                     on_token=on_token, **kw)
    else:
        runtime.warm_up(stages, texts=tokens, link=profile, **kw)
        out, rep = executor.score(stages, tokens, channel=channel, **kw)
    return {"workdir": workdir, "plan": info, "link": profile.name, "summary": rep.summary(),
            "requests": [r.__dict__ for r in rep.requests],
            "method": "measured stage compute (this CPU, fake devices) + emulated link",
            "output": out}


def _generate_split(args: argparse.Namespace) -> str:
    from ec2moe_jax.data import ByteTokenizer
    from ec2moe_jax.training import load_workdir_config

    workdir = _common.workdir(args)
    cfg = load_workdir_config(workdir).model
    ids = _prompt_ids(args, cfg.vocab_size)
    n = _new_tokens(args.max_new_tokens, len(ids), cfg.max_seq_len)
    tok = ByteTokenizer()
    ids_out = args.prompt_ids is not None
    prompt = _common.printable(args.prompt)
    started = []

    # Streams request 0 as the plain path prints it: the prompt text and the new text, or
    # the new token ids alone. The prompt goes out with the first token, after the stages
    # compiled (their progress lines are on stderr).
    def on_token(_, tokens, __):
        t = int(tokens[0])
        if ids_out:
            print(("," if started else "") + str(t), end="", flush=True)
        else:
            print(("" if started else prompt) + tok.decode([t]), end="", flush=True)
        started.append(True)

    rec = _run_split(args, workdir, np.asarray([ids], np.int32), max_new_tokens=n,
                     on_token=on_token)
    print()
    _common.status(json.dumps(rec["summary"], indent=1))
    new = rec["output"][0].tolist()
    if ids_out:
        return ",".join(str(int(i)) for i in new)
    return prompt + tok.decode(new)


def score(args: argparse.Namespace) -> dict:
    from ec2moe_jax.data import ByteTokenizer
    from ec2moe_jax.training import load_workdir_config

    workdir = _common.workdir(args)
    cfg = load_workdir_config(workdir).model
    limit = cfg.max_seq_len + 1
    if args.text is None:
        ids = ByteTokenizer().encode(DEFAULT_TEXT)[:limit]
        if len(ids) < len(DEFAULT_TEXT):
            _common.status(f"scoring the first {limit} bytes of the default text (the model's "
                           f"max_seq_len {cfg.max_seq_len} + 1)")
    else:
        ids = np.frombuffer(_common.argument_bytes(args.text), np.uint8).astype(np.int32)
    if not 2 <= len(ids) <= limit:
        raise ValueError(f"--text holds {len(ids)} bytes; scoring needs 2 to the model's "
                         f"max_seq_len + 1 = {limit} (each byte after the first is predicted)")
    rec = _run_split(args, workdir, np.asarray(ids, np.int32)[None])
    lp = rec.pop("output")
    rec["bits_per_char"] = float(-np.mean(lp) / np.log(2))
    if args.json:
        print(json.dumps({k: rec[k] for k in ("workdir", "plan", "link", "summary",
                                              "bits_per_char", "method")}))
    else:
        print(json.dumps(rec["summary"], indent=1))
        print(f"bits/char {rec['bits_per_char']:.4f} ({rec['method']})")
    return rec


def evaluate(args: argparse.Namespace) -> dict:
    from ec2moe_jax.data import prepare_splits
    from ec2moe_jax.training import evaluate as evaluate_lm
    from ec2moe_jax.training import load_params

    workdir = _common.workdir(args)
    setup, params = load_params(workdir)
    cfg = setup.cfg
    splits = prepare_splits(cfg.data)
    stride = None if args.stride == 0 else args.stride
    tokens = getattr(splits, args.split)
    window = cfg.train.seq_len
    used = cfg.train.eval_stride if stride == -1 else stride
    _common.status(f"scoring the {args.split} split ({len(tokens):,} bytes, windows of {window}"
                   + (f", stride {used}" if used else ", disjoint") + ")")
    bpc = evaluate_lm(setup, params, tokens, stride=stride, progress=f"{args.split} split")
    record = {"workdir": workdir, "split": args.split, "bits_per_char": bpc, "window": window,
              "stride": used, "method": "measured"}
    print(json.dumps(record) if args.json else f"{args.split} bits/char: {bpc:.4f}")
    return record


def describe_plan(plan: dict, num_experts: int) -> str:
    """A plan (``PipelinePlan.to_json()``) in words: where the split is, which experts stay
    resident on the end, what crosses the link, the micro-batch."""
    split, resident = int(plan["split"]), list(plan["resident"])
    layers = len(resident)
    if split == 0:
        where = "cloud-only (every layer on the cloud; token ids cross the link)"
    elif split == layers:
        where = f"end-only (all {layers} layers on the end)"
    else:
        ends = f"layers 0-{split - 1}" if split > 1 else "layer 0"
        where = f"split after layer {split} of {layers} ({ends} on the end)"
    if split == 0:
        experts = ""
    elif all(n >= num_experts for n in resident[:split]):
        experts = "; every expert resident on the end"
    else:
        fate = "swapped in from storage when chosen" if plan.get("swap") else "dropped"
        experts = (f"; resident experts per end layer {resident[:split]} of {num_experts} "
                   f"(the others {fate})")
    from ec2moe_jax.codec import CodecSpec

    spec = CodecSpec.parse(str(plan.get("codec", "bf16")))
    if 0 < split < layers:
        if not spec.lowrank:
            link = f"; hidden states cross as {spec.kind} (no codec)"
        else:
            link = f"; low-rank codec rank {spec.rank} with {spec.kind} latents on the link"
    else:
        link = ""
    return f"{where}{experts}{link}; micro-batch {plan.get('micro_batch', 1)}"
