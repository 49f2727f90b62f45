"""The pipeline executor: runs a split (:class:`~.stages.Stages`) over a batch of requests,
in micro-batches, for single-pass scoring and for autoregressive generation.

Shape legend: N requests, B micro-batch, T scored tokens, P prompt length, G generated
tokens, V vocab.

Timing model. Every stage call really runs on its submesh; its compute time is measured
(``jax.block_until_ready`` around the call, the default ``timer``) or fixed by a test. The
link is emulated on a virtual clock (:mod:`~.link`). Each resource (end device, uplink,
cloud, downlink) serves work in issue order, so the executor composes a pipelined timeline:
while the cloud computes micro-batch ``i`` the end computes ``i + 1`` and the link carries
the next payload. All requests arrive at ``t = 0``. Figures from this timeline are
"measured compute + emulated link"; ``pace=True`` additionally sleeps so wall time follows
the timeline (real-time mode, for demos). :func:`score_overlapped` measures real overlap of
the two submeshes under JAX's asynchronous dispatch (no link) for comparison.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.pipeline.link import Channel
from ec2moe_jax.pipeline.stages import TOKEN_BYTES, Stages, place, token_message_bytes

Timer = Callable[..., tuple[Any, float]]


def measured(name: str, fn: Callable, *args) -> tuple[Any, float]:
    """Runs ``fn(*args)`` to completion; returns (result, wall seconds)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def fixed_times(seconds: dict[str, float]) -> Timer:
    """A timer that runs each stage but charges it ``seconds[name]`` (deterministic tests;
    names: end, cloud, hop, end_prefill, end_step, cloud_prefill, cloud_step)."""

    def timer(name, fn, *args):
        return jax.block_until_ready(fn(*args)), float(seconds.get(name, 0.0))

    return timer


@dataclasses.dataclass
class RequestStats:
    """One request: times in seconds from its arrival; bytes are its share of its
    micro-batch's messages (every attempt counted)."""

    id: int
    latency_s: float
    ttft_s: float | None = None
    tpot_s: float | None = None
    bytes_up: float = 0.0
    bytes_down: float = 0.0
    attempts: int = 1


@dataclasses.dataclass
class Report:
    """Per-request statistics, per-stage measured compute times and totals."""

    workload: str
    requests: list[RequestStats]
    stage_seconds: dict[str, list[float]]
    makespan_s: float
    tokens: int  # scored or generated tokens in all
    bytes_up: int
    bytes_down: int
    served: dict = dataclasses.field(default_factory=dict, repr=False)  # key -> times served
    logits: np.ndarray | None = dataclasses.field(default=None, repr=False)  # [N, T, V]

    def summary(self) -> dict:
        lat = np.array([r.latency_s for r in self.requests])
        out = {"workload": self.workload, "requests": len(self.requests),
               "makespan_s": self.makespan_s,
               "throughput_tokens_per_s": self.tokens / max(self.makespan_s, 1e-12),
               "throughput_requests_per_s": len(self.requests) / max(self.makespan_s, 1e-12),
               "latency_p50_s": float(np.median(lat)), "latency_max_s": float(lat.max()),
               "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
               "bytes_up_per_request": self.bytes_up / len(self.requests),
               "bytes_down_per_request": self.bytes_down / len(self.requests),
               "stage_seconds_median": {k: float(np.median(v))
                                        for k, v in self.stage_seconds.items()}}
        if self.requests[0].ttft_s is not None:
            out["ttft_mean_s"] = float(np.mean([r.ttft_s for r in self.requests]))
            tpot = [r.tpot_s for r in self.requests if r.tpot_s is not None]
            out["tpot_mean_s"] = float(np.mean(tpot)) if tpot else None
        return out


class _Clock:
    """Virtual-time bookkeeping of the two compute resources (FIFO), stage timings and
    optional pacing of wall time."""

    def __init__(self, timer: Timer, pace: bool):
        self.timer, self.pace = timer, pace
        self.end_free = self.cloud_free = 0.0
        self.seconds: dict[str, list[float]] = {}
        self.t0 = time.perf_counter()

    def run(self, name: str, fn, *args):
        out, dt = self.timer(name, fn, *args)
        self.seconds.setdefault(name, []).append(dt)
        return out, dt

    def end(self, ready: float, dt: float) -> float:
        self.end_free = max(ready, self.end_free) + dt
        return self.wait(self.end_free)

    def cloud(self, ready: float, dt: float) -> float:
        self.cloud_free = max(ready, self.cloud_free) + dt
        return self.wait(self.cloud_free)

    def wait(self, t: float) -> float:
        if self.pace:
            time.sleep(max(0.0, self.t0 + t - time.perf_counter()))
        return t


def micro_batches(n: int, size: int) -> list[np.ndarray]:
    if size < 1:
        raise ValueError(f"micro-batch size {size} must be >= 1")
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


def _check_tokens(stages: Stages, tokens: np.ndarray, what: str) -> np.ndarray:
    tokens = np.asarray(tokens, np.int32)
    v = stages.model.cfg.vocab_size
    if tokens.ndim != 2 or tokens.size == 0:
        raise ValueError(f"{what} must be a non-empty [N, T] array of token ids, got shape "
                         f"{tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= v:
        raise ValueError(f"{what} ids must lie in [0, vocab_size={v})")
    return tokens


def _stats(ids, latency, up=0, down=0, att=1, **kw) -> list[RequestStats]:
    b = len(ids)
    return [RequestStats(int(i), latency, bytes_up=up / b, bytes_down=down / b,
                         attempts=att, **kw) for i in ids]


def score(stages: Stages, tokens: np.ndarray, *, channel: Channel, micro_batch: int = 1,
          timer: Timer = measured, pace: bool = False, keep_logits: bool = False
          ) -> tuple[np.ndarray, Report]:
    """Single-pass split scoring of ``tokens`` [N, T + 1]: returns the log-probability of
    each next token, <float32>[N, T], and the :class:`Report` (with the logits [N, T, V] if
    ``keep_logits``: they stay in the cloud otherwise, only the scores come back).

    A split request sends its boundary hidden state and its T target ids up (they travel
    in the same message) and gets T float32 scores back; cloud-only sends the T input ids.
    """
    tokens = _check_tokens(stages, tokens, "tokens")
    if tokens.shape[1] < 2:
        raise ValueError("scoring needs at least 2 tokens per request (input and target)")
    clock, out, reqs, logits = _Clock(timer, pace), [], [], []
    end, cloud, p = stages.end_mesh, stages.cloud_mesh, stages
    for i, idx in enumerate(micro_batches(len(tokens), micro_batch)):
        x, y, b, t = tokens[idx, :-1], tokens[idx, 1:], len(idx), tokens.shape[1] - 1
        ex = None
        if stages.end_only:
            (lg, lp), dt = clock.run("end", p.score_end, p.end_params, p.end_extra,
                                     place(x, end, b), place(y, end, b))
            done = clock.end(0.0, dt)
        else:
            ready, msg = 0.0, x
            if not stages.cloud_only:
                msg, dt = clock.run("end", p.score_end, p.end_params, p.end_extra,
                                    place(x, end, b), None)
                ready = clock.end(0.0, dt)
            result = {}

            def serve(arrival, msg=msg, y=y, b=b, result=result):
                m, dt_hop = clock.run("hop", place, (msg, y), cloud, b)
                (result["lg"], result["lp"]), dt = clock.run(
                    "cloud", p.score_cloud, p.cloud_params, p.cloud_codec, *m)
                return clock.cloud(arrival, dt_hop + dt)

            up = stages.up_bytes(b, t) + (0 if stages.cloud_only else TOKEN_BYTES * b * t)
            ex = channel.round_trip(("score", i), ready, up, serve, token_message_bytes(b, t))
            done, lp, lg = clock.wait(ex.arrival), result["lp"], result["lg"]
        out.append(np.asarray(lp))
        if keep_logits:
            logits.append(np.asarray(lg))
        reqs += (_stats(idx, done) if ex is None
                 else _stats(idx, done, ex.bytes_up, ex.bytes_down, ex.attempts))
    rep = Report("score", reqs, clock.seconds, max(r.latency_s for r in reqs),
                 int(tokens.shape[0] * (tokens.shape[1] - 1)), channel.up.bytes,
                 channel.down.bytes, dict(channel.served_count),
                 np.concatenate(logits) if keep_logits else None)
    return np.concatenate(out), rep


@dataclasses.dataclass
class _Stream:
    """Decoding state of one micro-batch."""

    idx: np.ndarray
    end_cache: Any
    cloud_cache: Any
    ready: float = 0.0  # when its last token reached the end
    cloud_done: float = 0.0  # when the cloud finished its last step
    token: Any = None  # last sampled token, <int32>[B] on the cloud (or end) mesh
    times: list = dataclasses.field(default_factory=list)
    out: list = dataclasses.field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    attempts: int = 1


def _decode_one(stages: Stages, clock: _Clock, channel: Channel, s: _Stream, k: int,
                inputs, rng) -> None:
    """Step ``k`` (0 = prefill with ``inputs`` [B, P]) of one micro-batch stream."""
    p, b = stages, len(s.idx)
    kind = "prefill" if k == 0 else "step"
    end_fn = p.prefill_end if k == 0 else p.step_end
    cloud_fn = p.prefill_cloud if k == 0 else p.step_cloud
    if stages.end_only:
        (s.end_cache, (tok, _)), dt = clock.run(f"end_{kind}", end_fn, p.end_params,
                                                p.end_extra, s.end_cache, inputs, rng)
        s.token, s.ready = tok, clock.end(s.ready, dt)
    elif stages.cloud_only and k > 0:  # the cloud feeds back its own token; tokens stream
        (s.cloud_cache, (tok, _)), dt = clock.run("cloud_step", cloud_fn, p.cloud_params,
                                                  p.cloud_codec, s.cloud_cache,
                                                  s.token[:, None], rng)
        done = clock.cloud(s.cloud_done, dt)
        s.token, s.cloud_done = tok, done
        ex = channel.push(("token", int(s.idx[0]), k), done, token_message_bytes(b, 1))
        s.ready, s.bytes_down = ex.arrival, s.bytes_down + ex.bytes_down
        s.attempts = max(s.attempts, ex.attempts)
    else:
        ready, msg = s.ready, inputs
        if not stages.cloud_only:
            (s.end_cache, msg), dt = clock.run(f"end_{kind}", end_fn, p.end_params,
                                               p.end_extra, s.end_cache, inputs, rng)
            ready = clock.end(s.ready, dt)
        result = {}

        def serve(arrival):
            m, dt_hop = clock.run("hop", place, msg, p.cloud_mesh, b)
            (s.cloud_cache, (result["tok"], _)), dt = clock.run(
                f"cloud_{kind}", cloud_fn, p.cloud_params, p.cloud_codec, s.cloud_cache, m, rng)
            s.cloud_done = clock.cloud(arrival, dt_hop + dt)
            return s.cloud_done

        t = inputs.shape[1]
        ex = channel.round_trip((kind, int(s.idx[0]), k), ready, stages.up_bytes(b, t), serve,
                                token_message_bytes(b, 1))
        s.token, s.ready = result["tok"], ex.arrival
        s.bytes_up, s.bytes_down = s.bytes_up + ex.bytes_up, s.bytes_down + ex.bytes_down
        s.attempts = max(s.attempts, ex.attempts)
    s.times.append(clock.wait(s.ready))
    s.out.append(np.asarray(s.token))


def generate(stages: Stages, prompts: np.ndarray, max_new_tokens: int, *, channel: Channel,
             micro_batch: int = 1, timer: Timer = measured, pace: bool = False,
             rng: jax.Array | None = None,
             on_token: Callable[[np.ndarray, np.ndarray, float], None] | None = None,
             ) -> tuple[np.ndarray, Report]:
    """Generates ``max_new_tokens`` after each prompt of ``prompts`` [N, P] -> <int32>[N, G]
    with KV caches on both sides; micro-batches take turns step by step (pipelined).

    ``on_token(request_ids [B], tokens [B], t)`` streams every token as it reaches the end
    (``t``: seconds on the timeline).
    """
    prompts = _check_tokens(stages, prompts, "prompts")
    n, plen = prompts.shape
    limit = stages.model.cfg.max_seq_len
    if max_new_tokens < 1 or plen + max_new_tokens > limit:
        raise ValueError(f"prompt length {plen} + {max_new_tokens=} must be <= max_seq_len="
                         f"{limit} and max_new_tokens >= 1")
    rng = jax.random.key(0) if rng is None else rng
    clock = _Clock(timer, pace)
    streams = []
    for idx in micro_batches(n, micro_batch):
        ec, cc = stages.init_caches(len(idx))
        streams.append(_Stream(idx, ec, cc))
    for k in range(max_new_tokens):
        for s in streams:
            rng, sub = jax.random.split(rng)
            b = len(s.idx)
            mesh = stages.cloud_mesh if stages.cloud_only else stages.end_mesh
            if k == 0:
                inputs = place(prompts[s.idx], mesh, b)
            else:  # the sampled token comes back to the end (cloud-only: stays put)
                inputs = None if stages.cloud_only else place(s.token[:, None], mesh, b)
            _decode_one(stages, clock, channel, s, k, inputs, sub)
            if on_token is not None:
                on_token(s.idx, s.out[-1], s.times[-1])
    reqs = []
    for s in streams:
        ttft, last = s.times[0], s.times[-1]
        tpot = (last - ttft) / (max_new_tokens - 1) if max_new_tokens > 1 else None
        reqs += _stats(s.idx, last, s.bytes_up, s.bytes_down, s.attempts, ttft_s=ttft,
                       tpot_s=tpot)
    out = np.concatenate([np.stack(s.out, 1) for s in streams])
    rep = Report("generate", reqs, clock.seconds, max(r.latency_s for r in reqs),
                 n * max_new_tokens, channel.up.bytes, channel.down.bytes,
                 dict(channel.served_count))
    return out, rep


def score_overlapped(stages: Stages, tokens: np.ndarray, micro_batch: int) -> tuple[float, float]:
    """Measured wall seconds of split scoring with asynchronous dispatch (end of micro-batch
    ``i + 1`` dispatched before the cloud's ``i`` completes; no link emulation), and of the
    same work run stage by stage with a block after each: (overlapped, sequential)."""
    if stages.end_only or stages.cloud_only:
        raise ValueError("overlap needs a split with work on both sides")
    tokens = _check_tokens(stages, tokens, "tokens")
    mbs = micro_batches(len(tokens), micro_batch)
    p = stages

    def run(block: bool) -> float:
        t0, outs = time.perf_counter(), []
        for idx in mbs:
            b = len(idx)
            msg = p.score_end(p.end_params, p.end_extra, place(tokens[idx, :-1], p.end_mesh, b),
                              None)
            if block:
                jax.block_until_ready(msg)
            m, y = place((msg, tokens[idx, 1:]), p.cloud_mesh, b)
            outs.append(p.score_cloud(p.cloud_params, p.cloud_codec, m, y)[1])
            if block:
                jax.block_until_ready(outs[-1])
        jax.block_until_ready(outs)
        return time.perf_counter() - t0

    run(True)  # compile
    return run(False), run(True)


def full_logits(model, params, tokens) -> jnp.ndarray:
    """The unsplit model's logits [N, T, V] (the reference the pipeline must match)."""
    return model.apply({"params": params}, jnp.asarray(tokens, jnp.int32))
