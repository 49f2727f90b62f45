"""The pipeline executor: runs a split over a batch of requests, in micro-batches, for
single-pass scoring and for autoregressive generation, through the stage engine
(:mod:`~.engine`: the end and cloud jobs and their message bytes).

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

from ec2moe_jax.models.generate import PROMPT_BUCKET_MIN, request_cache_length
from ec2moe_jax.models.lm import cache_bucket
from ec2moe_jax.pipeline.engine import (
    CloudEngine,
    EndEngine,
    Message,
    Scores,
    Timer,
    fixed_times,
    measured,
)
from ec2moe_jax.pipeline.link import Channel
from ec2moe_jax.pipeline.stages import Stages

__all__ = ["Report", "RequestStats", "Timer", "fixed_times", "full_logits", "generate",
           "measured", "micro_batches", "score", "score_overlapped"]


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
    end, cloud = EndEngine(stages, clock.run), CloudEngine(stages, clock.run)
    for i, idx in enumerate(micro_batches(len(tokens), micro_batch)):
        b, t = len(idx), tokens.shape[1] - 1
        up, dt = end.score(tokens[idx])
        ready, ex = clock.end(0.0, dt), None  # 0 s at split 0: the end only sends the ids
        if isinstance(up, Scores):  # split L: nothing crosses
            res, done = up, ready
        else:
            box = {}

            def serve(arrival, up=up, box=box):
                box["res"], dt = cloud.score(up)
                return clock.cloud(arrival, dt)

            ex = channel.round_trip(("score", i), ready, up.nbytes, serve,
                                    cloud.reply_bytes(b, t))
            done, res = clock.wait(ex.arrival), box["res"]
        out.append(np.asarray(res.logprobs))
        if keep_logits:
            logits.append(np.asarray(res.logits))
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


def _decode_one(end: EndEngine, cloud: CloudEngine, clock: _Clock, channel: Channel,
                s: _Stream, k: int, prompts: np.ndarray, plen: int, rng) -> None:
    """Step ``k`` (0 = prefill with ``prompts`` [B, Pb], valid up to ``plen``) of one
    micro-batch stream."""
    kind = "prefill" if k == 0 else "step"
    if end.stages.cloud_only and k > 0:  # the cloud feeds back its own token; tokens stream
        s.cloud_cache, res, dt = cloud.generate(s.cloud_cache, s.token, rng)
        s.cloud_done = clock.cloud(s.cloud_done, dt)
        ex = channel.push(("token", int(s.idx[0]), k), s.cloud_done, res.nbytes)
        s.token, s.ready, s.bytes_down = res.token, ex.arrival, s.bytes_down + ex.bytes_down
        s.attempts = max(s.attempts, ex.attempts)
    else:
        lengths = np.full(len(s.idx), plen, np.int32)
        s.end_cache, up, dt = (end.prefill(s.end_cache, prompts, rng, lengths) if k == 0
                               else end.step(s.end_cache, s.token, rng))
        ready = clock.end(s.ready, dt)  # 0 s at split 0: the end only sends the ids
        if not isinstance(up, Message):  # split L: the end sampled, nothing crosses
            s.token, s.ready = up.token, ready
        else:
            box = {}

            def serve(arrival):
                fn = cloud.prefill if k == 0 else cloud.step
                s.cloud_cache, box["res"], dt = fn(s.cloud_cache, up, rng)
                s.cloud_done = clock.cloud(arrival, dt)
                return s.cloud_done

            ex = channel.round_trip((kind, int(s.idx[0]), k), ready, up.nbytes, serve,
                                    cloud.reply_bytes(len(s.idx), 1))
            s.token, s.ready = box["res"].token, ex.arrival
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
    end, cloud = EndEngine(stages, clock.run), CloudEngine(stages, clock.run)
    # Caches sized to the request and prompts right-padded to a bucket: requests of similar
    # lengths reuse the compiled stages (padding is not sent: bytes count valid positions).
    m = request_cache_length(stages.model.cfg, plen, max_new_tokens)
    padded = np.zeros((n, cache_bucket(plen, limit, PROMPT_BUCKET_MIN)), np.int32)
    padded[:, :plen] = prompts
    streams = [_Stream(idx, end.init_cache(len(idx), m), cloud.init_cache(len(idx), m))
               for idx in micro_batches(n, micro_batch)]
    for k in range(max_new_tokens):
        for s in streams:
            rng, sub = jax.random.split(rng)
            _decode_one(end, cloud, clock, channel, s, k, padded[s.idx], plen, sub)
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


def _dispatched(name, fn, *args):
    return fn(*args), 0.0


def _blocked(name, fn, *args):
    return jax.block_until_ready(fn(*args)), 0.0


def score_overlapped(stages: Stages, tokens: np.ndarray, micro_batch: int) -> tuple[float, float]:
    """Measured wall seconds of split scoring with asynchronous dispatch (end of micro-batch
    ``i + 1`` dispatched before the cloud's ``i`` completes; no link emulation), and of the
    same work run stage by stage with a block after each (hop included): (overlapped,
    sequential)."""
    if stages.end_only or stages.cloud_only:
        raise ValueError("overlap needs a split with work on both sides")
    tokens = _check_tokens(stages, tokens, "tokens")
    mbs = micro_batches(len(tokens), micro_batch)

    def run(timer: Timer) -> float:
        end, cloud = EndEngine(stages, timer), CloudEngine(stages, timer)
        t0 = time.perf_counter()
        outs = [cloud.score(end.score(tokens[idx])[0])[0].logprobs for idx in mbs]
        jax.block_until_ready(outs)
        return time.perf_counter() - t0

    run(_blocked)  # compile
    return run(_dispatched), run(_blocked)


def full_logits(model, params, tokens) -> jnp.ndarray:
    """The unsplit model's logits [N, T, V] (the reference the pipeline must match)."""
    return model.apply({"params": params}, jnp.asarray(tokens, jnp.int32))
