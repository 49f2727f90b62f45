"""The README's main command (``ec2moe demo``): one cloud server process and several end client
processes on loopback, through a relay that shapes the link like LTE.

What runs, all of it real: an ``ec2moe serve`` process (its own JAX runtime; the cloud layers of
every session's split and the head, continuous batching over its sessions), ``clients`` client
processes (each its own JAX runtime with the end layers, resident experts and codec of its
plan), gRPC over TCP sockets on 127.0.0.1. What is emulated: the link's one-way delay and
bandwidth (the asyncio relay of :mod:`ec2moe_jax.serving.relay`, the preset's figures), and
that the end is a separate device (every process shares this CPU).

Half the clients (at least one) run **EC2MoE under privacy**: the scheduler's plan for this
CPU as the end device over the link, its memory holding a share of the experts (10% by
default), with at least one layer on the end (``min_end_layers``
= 1: raw token ids never leave the device, so the hidden state crosses the link, compressed
by the plan's codec). The others run **cloud-only** (token ids up, tokens down), the plan
every cloud LLM API uses. All start at the same moment; client 0's text is streamed as it
arrives. Per client: TTFT, TPOT p50/p99, bytes per token each way (protobuf bytes counted by
the client), reconnects; the server's batch occupancy; the relay's byte counts.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from ec2moe_jax.bench.serving import SLOTS, _quantiles, serving_setup

PRIVATE, CLOUD_ONLY = "ec2moe-private", "cloud-only"


def demo_plans(cfg, freq, link, inputs: dict, *, prompt_tokens: int, gen_tokens: int,
               expert_fraction: float) -> dict:
    """``{"ec2moe-private": plan, "cloud-only": plan}`` for this CPU over ``link``, its
    memory holding ``expert_fraction`` of the experts (see
    :func:`ec2moe_jax.scheduler.this_cpu`).

    Args:
      inputs: the scheduler's inputs: ``calibration``, ``pipeline_calibration`` (or None),
        ``codec_sweep`` paths.

    Raises:
      ValueError: no plan keeps a layer on the end within the constraints.
    """
    from ec2moe_jax.pipeline.plans import baseline, from_scheduler, instance
    from ec2moe_jax.scheduler import codec_options, this_cpu
    from ec2moe_jax.scheduler.plan import schedule_checked

    dev, cal, cloud_cal = this_cpu(cfg, inputs["calibration"], inputs["pipeline_calibration"],
                                   expert_fraction=expert_fraction)
    inst = instance(cfg, freq, dev, link, cal, prompt_tokens=prompt_tokens,
                    gen_tokens=gen_tokens, cloud_cal=cloud_cal,
                    codecs=codec_options(cfg.d_model, inputs["codec_sweep"]))
    inst = inst.replace(min_end_layers=inst.min_end_layers * 0 + 1)  # privacy
    plan, _ = schedule_checked(inst)
    return {PRIVATE: from_scheduler(plan, inst, cfg, PRIVATE),
            CLOUD_ONLY: baseline("cloud-only", cfg)}


def check_options(*, clients: int, tokens: int, expert_fraction: float) -> None:
    """Refuses options :func:`run_demo` cannot run, before any work (training included).

    Raises:
      ValueError: fewer than 2 or more than 16 clients, no new tokens, or an expert fraction
        outside [0, 1]; the message names the flag.
    """
    if not 2 <= clients <= SLOTS:
        raise ValueError(f"--clients {clients}: the demo runs 2 to {SLOTS} client processes")
    if tokens < 1:
        raise ValueError(f"--max-new-tokens {tokens}: each client generates at least 1 token")
    if not 0.0 <= expert_fraction <= 1.0:
        raise ValueError(f"--expert-fraction {expert_fraction}: a share of the experts, in "
                         "[0, 1]")


def run_demo(workdir: str, *, link_name: str, prompt: list[int], tokens: int, clients: int,
             inputs: dict, expert_fraction: float = 0.1, on_plan=None, on_token=None,
             on_stream_end=None, server_devices: int = 1) -> dict:
    """Runs the demo (module docstring) and returns its JSON-ready record.

    Args:
      prompt: the streamed client's prompt (token ids); the others use windows of the
        held-out text of the same length.
      tokens: new tokens per client.
      clients: client processes (2-16; half run EC2MoE's private plan).
      expert_fraction: share of the experts the end device's memory holds (the default,
        10%, is what leaves room for a split on the small model: with half of them this
        CPU runs every layer itself, swapping experts in).
      on_plan: ``on_plan(name, plan JSON)`` once the plans are known.
      on_token: ``on_token(token id)`` for each of client 0's tokens as it arrives.
      on_stream_end: called once every client has finished, before the processes stop.
      server_devices: devices of the server's mesh (fake CPU devices share the cores).

    Raises:
      ValueError: fewer than 2 or more than 16 clients, no new tokens, a request longer than
        the model's max_seq_len, or an expert fraction outside [0, 1].
      RuntimeError: the server or a client process failed to start.
    """
    import grpc

    from ec2moe_jax.profiles import link as link_preset
    from ec2moe_jax.serving.protocol import pb, pb_grpc
    from ec2moe_jax.serving.relay import Shape
    from ec2moe_jax.training import load_run

    check_options(clients=clients, tokens=tokens, expert_fraction=expert_fraction)
    load_start, t0 = os.getloadavg()[0], time.monotonic()
    setup, _, splits, freq = load_run(workdir)
    cfg = setup.cfg.model
    if len(prompt) + tokens > cfg.max_seq_len:
        raise ValueError(f"--max-new-tokens {tokens}: with the {len(prompt)}-token prompt it "
                         f"exceeds the model's max_seq_len {cfg.max_seq_len}; use at most "
                         f"{cfg.max_seq_len - len(prompt)}")
    link = link_preset(link_name)
    plans = demo_plans(cfg, freq, link, inputs, prompt_tokens=len(prompt), gen_tokens=tokens,
                       expert_fraction=expert_fraction)
    for name, plan in plans.items():
        if on_plan is not None:
            on_plan(name, plan.to_json())
    roles = [PRIVATE if i < max(1, clients // 2) else CLOUD_ONLY for i in range(clients)]
    groups = sorted({(plans[r].split, plans[r].codec) for r in roles
                     if plans[r].split < cfg.num_layers})
    cache_len = min(cfg.max_seq_len, 1 << (len(prompt) + tokens - 1).bit_length())
    _say(f"starting the cloud server (groups {', '.join(f'{s}:{c}' for s, c in groups)}; "
         f"compiling them first) and {clients} end client processes")
    with serving_setup(workdir, groups, clients=clients, cache_len=cache_len,
                       devices=server_devices, prompt_len=len(prompt)) as (port, relay, pool):
        relay.set_shape(Shape(delay_s=link.rtt_s / 2, rate_bps=link.bandwidth_bps))
        test = np.asarray(splits.test)
        starts = np.linspace(0, len(test) - len(prompt) - 1, clients).astype(int)
        prompts = [list(prompt)] + [test[s:s + len(prompt)].tolist() for s in starts[1:]]
        commands = [{"address": relay.address, "plan": plans[r].to_json(), "prompt": p}
                    for r, p in zip(roles, prompts, strict=True)]
        _say("connecting and compiling the end stages (one warm-up request per client)")
        pool.run_each([{**c, "tokens": 2} for c in commands])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.CloudStub(ch)
            before, bytes0 = stub.Stats(pb.StatsRequest(), timeout=30), relay.bytes()
            start_at = time.time() + 0.5
            commands[0]["stream"] = True
            out = pool.run_each([{**c, "tokens": tokens, "start_at": start_at}
                                 for c in commands],
                                on_token=lambda i, t: on_token(t) if on_token else None)
            after, bytes1 = stub.Stats(pb.StatsRequest(), timeout=30), relay.bytes()
        if on_stream_end is not None:
            on_stream_end()  # before the processes stop (and log that they do)
    steps = after.steps - before.steps
    step_tokens = (after.tokens - before.tokens) - sum(
        plans[r].split < cfg.num_layers for r in roles)  # one prefill token per served client
    return {
        "benchmark": "ec2moe demo (serving)",
        "workdir": workdir,
        "link": {"name": link.name, "bandwidth_bps": link.bandwidth_bps, "rtt_s": link.rtt_s},
        "prompt_tokens": len(prompt), "new_tokens": tokens,
        "plans": {name: plan.to_json() for name, plan in plans.items()},
        "end_expert_fraction": expert_fraction,
        "clients": [_client_row(i, r, plans[r], o, tokens) for i, (r, o)
                    in enumerate(zip(roles, out, strict=True))],
        "server": {"devices": server_devices, "batched_steps": steps,
                   "batch_occupancy": step_tokens / steps if steps else None,
                   "step_s_median": after.step_s, "prefill_s_median": after.prefill_s},
        "relay_bytes": {"up": bytes1["up"] - bytes0["up"],
                        "down": bytes1["down"] - bytes0["down"]},
        "wall_s": time.monotonic() - t0,  # loading, compiling and running, this process
        # Other jobs may share the machine: the 1-minute load average around the run.
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "method": {
            "measured": "one `ec2moe serve` process and the client processes on this CPU "
                        "(its cores shared by all of them), real gRPC over TCP on 127.0.0.1; "
                        "times are wall-clock at each client (TTFT from the request's start, "
                        "TPOT between its tokens); bytes per token are protobuf bytes counted "
                        "by each client (relay_bytes: every byte through the relay, HTTP/2 "
                        "framing included)",
            "emulated": f"the link ({link.name}: {link.bandwidth_bps / 1e6:g} Mbit/s, RTT "
                        f"{link.rtt_s * 1e3:g} ms) by an asyncio relay; the end devices are "
                        "processes on the same CPU as the cloud",
        },
    }


def _client_row(i: int, role: str, plan, out: dict, tokens: int) -> dict:
    times = out["times"]
    tpot = np.diff(times) if len(times) > 1 else np.zeros(1)
    return {"client": i, "plan": role, "split": plan.split, "codec": plan.codec,
            "resident": list(plan.resident), "ttft_s": times[0] - out["start"],
            "tpot_s": _quantiles(tpot), "latency_s": times[-1] - out["start"],
            "bytes_up_per_token": out["bytes_up"] / tokens,
            "bytes_down_per_token": out["bytes_down"] / tokens,
            "reconnects": out["reconnects"], "tokens": out["tokens"]}


def plot_demo(result: dict, path: str) -> str:
    """TTFT and TPOT p50 per client (left), bytes per token each way (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = result["clients"]
    x = np.arange(len(rows))
    colors = ["tab:blue" if r["plan"] == PRIVATE else "tab:orange" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=120)
    axes[0].bar(x, [r["ttft_s"] * 1e3 for r in rows], color=colors)
    axes[0].set_ylabel("TTFT (ms)")
    axes[1].bar(x, [r["tpot_s"]["p50"] * 1e3 for r in rows], color=colors)
    axes[1].set_ylabel("TPOT p50 (ms)")
    w = 0.4
    for bars in (axes[2].bar(x - w / 2, [r["bytes_up_per_token"] for r in rows], w,
                             color=colors, label="up"),
                 axes[2].bar(x + w / 2, [r["bytes_down_per_token"] for r in rows], w,
                             color=colors, alpha=0.5, hatch="//", label="down")):
        axes[2].bar_label(bars, fmt="%.1f", fontsize=7)
    axes[2].set_yscale("log")
    axes[2].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[2].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[2].set_ylabel("bytes per token (protobuf)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, [f"{r['client']}\n{'EC2MoE' if r['plan'] == PRIVATE else r['plan']}"
                          for r in rows], fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    link = result["link"]
    fig.suptitle(f"ec2moe demo: 1 server + {len(rows)} client processes (measured, this CPU); "
                 f"link emulated ({link['name']}: {link['bandwidth_bps'] / 1e6:g} Mbit/s, RTT "
                 f"{link['rtt_s'] * 1e3:g} ms)\nEC2MoE (private) sends hidden states, never "
                 "token ids: a round trip per token; cloud-only streams tokens the server "
                 "feeds back itself", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _say(msg: str) -> None:
    print(f"ec2moe demo: {msg}", file=sys.stderr, flush=True)
