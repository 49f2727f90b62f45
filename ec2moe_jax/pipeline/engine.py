"""The stage engine: the one way to run an end job or a cloud job of a split and to count the
bytes that cross the link (after JetStream's ``engine_api.py``: prefill / insert / generate).

Shape legend: B batch (one micro-batch), T scored tokens, P prompt length, D model, R codec
rank, V vocab, M cache length (positions per row).

An :class:`EndEngine` runs the embedding, layers ``[0, s)`` and the link encoder and returns
a :class:`Message`; a :class:`CloudEngine` hops a message onto the cloud mesh, decodes it,
runs layers ``[s, L)`` and the head and returns :class:`Scores` or a :class:`Sample`. Each
side touches only its own mesh, parameters and KV cache, and a message is a pytree of arrays
(host or device) with its exact wire size, so the two sides can run in different processes
(the cloud behind a server) with the same calls. ``s = 0``: the end computes nothing and its
message is the token ids; ``s = L``: the end returns the final result and nothing crosses.

KV caches are explicit state: ``init_cache(B, M)`` gives a zeroed one of M positions per row
(size it to the request with :func:`~ec2moe_jax.models.lm.cache_bucket`), ``prefill`` and
``step`` take one and return the next (``step`` donates its argument). Every row keeps its
own position (``cache_index`` <int32>[B]), so sequences at different lengths share one cache.

Continuous batching (the server's decode state, after JetStream's ``insert``/``generate``
over all slots): one cache of S slot rows; :func:`insert` writes a prefilled sequence (a
batch-1 cache, possibly of a shorter length M) into any row without touching the others;
every step runs the whole slot batch with an **active-row mask**: ``step(..., active=[S])``
(or a :class:`Message` whose ``lengths`` are 0 for idle rows) advances only the active rows'
caches; an idle row's step writes one slot past its position, which stays masked and is
overwritten when the row next advances (a full row, at position M, would overwrite its last
slot: retire it), and its sampled token is to be ignored. Chosen over
gathering live rows into a dense bucket and scattering them back: no copy of the cache per
step, one compiled step per (S, M), and idle rows cost only their share of the batch.

Prompts may be right-padded (``lengths`` [B] valid tokens per row, so prompts of several
lengths share one compiled prefill and one batch); the padded positions are not counted as
wire bytes (the wire carries each row's valid positions; a receiver pads to its own bucket).

Both engines wrap one :class:`~.stages.Stages`, whose stage functions are jitted once per
split by :func:`~.stages.build_stages`; nothing is traced here. Every stage call goes through
``timer(name, fn, *args) -> (out, seconds)`` and every method returns the seconds charged:
wall time to completion by default (:func:`measured`), fixed seconds in tests
(:func:`fixed_times`). Stage names: end, end_prefill, end_step (end side); hop, cloud,
cloud_prefill, cloud_step (cloud side: the hop onto the cloud mesh is charged to the cloud).
Placing an input on the end mesh is not charged.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ec2moe_jax.models.lm import cache_length, cache_positions
from ec2moe_jax.pipeline.stages import TOKEN_BYTES, Stages, token_message_bytes
from ec2moe_jax.sharding import hop

Timer = Callable[..., tuple[Any, float]]


def measured(name: str, fn: Callable, *args) -> tuple[Any, float]:
    """Runs ``fn(*args)`` to completion; returns (result, wall seconds)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def fixed_times(seconds: dict[str, float]) -> Timer:
    """A timer that runs each stage but charges it ``seconds[name]`` (0 when absent), for
    deterministic tests; names as in the module docstring."""

    def timer(name, fn, *args):
        return jax.block_until_ready(fn(*args)), float(seconds.get(name, 0.0))

    return timer


@dataclasses.dataclass(frozen=True)
class Message:
    """One end-to-cloud message: what crosses the link, on the sender's devices (or host)
    until the receiver hops it onto its own mesh.

    Attributes:
      payload: the boundary state, a pytree of [B, T, ...] arrays: ``{"h": [B, T, D]}`` (raw
        float32 or bfloat16), ``{"q": <int8>[B, T, R], "scale": <float32>[B, T]}`` (a
        quantised codec), ``{"z": <float32>[B, T, R]}`` (float latents); at split 0 the
        token ids themselves, <int32>[B, T].
      targets: <int32>[B, T] ids to score, travelling in the same message (scoring only;
        None when decoding).
      nbytes: exact wire bytes of the message (headers included), see
        :meth:`EndEngine.message_bytes`; only valid positions count.
      lengths: <int32>[B] valid positions per row (right padding follows; 0: the row idles
        in this decode step), or None: all T. Decoding only.
    """

    payload: Any
    targets: Any
    nbytes: int
    lengths: Any = None

    @property
    def batch(self) -> int:
        return int(np.shape(jax.tree.leaves(self.payload)[0])[0])


@dataclasses.dataclass(frozen=True)
class Scores:
    """Result of scoring: ``logprobs`` <float32>[B, T] of each target, ``logits`` [B, T, V]
    (they stay where they were computed; only the scores travel back), ``nbytes`` the wire
    bytes of the reply (0 when the end computed them: nothing crossed)."""

    logprobs: jax.Array
    logits: jax.Array
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Sample:
    """Result of one decode step: the sampled ``token`` <int32>[B], the last position's
    ``logits`` <float32>[B, V] and ``nbytes``, the wire bytes of the reply that carries the
    token back (0 when the end sampled it)."""

    token: jax.Array
    logits: jax.Array
    nbytes: int


@functools.partial(jax.jit, donate_argnums=1)
def _write_rows(prefix, cache, slot):
    def one(p, c):  # rows [slot, slot + b) and, along a cache's M, positions [0, Mp)
        start = (slot,) + (0,) * (c.ndim - 1)
        return jax.lax.dynamic_update_slice(c, p.astype(c.dtype), start)

    return jax.tree.map(one, prefix, cache)


def insert(prefix, cache, slot: int):
    """Writes the KV cache ``prefix`` of b prefilled sequences into rows ``[slot, slot + b)``
    of the decode state ``cache`` of B sequences (the same side's layers), positions and
    keys/values alike, and returns the new state; the other rows are untouched and
    ``cache`` is donated. The prefix may hold fewer positions per row than the state (a
    prompt-sized prefill joining a longer decode state). The slot is a traced value: a new
    slot compiles nothing.

    Raises:
      ValueError: the two caches hold different layers, the rows fall outside ``[0, B)``,
        or the prefix holds more positions per row than the state.
    """
    if jax.tree.structure(prefix) != jax.tree.structure(cache):
        raise ValueError("the prefix and the decode state hold different layers (a prefix "
                         "of the other side, or of another split?)")
    if not jax.tree.leaves(cache):  # no layers on this side (end at split 0, cloud at L)
        return cache
    b, big = cache_positions(prefix).shape[0], cache_positions(cache).shape[0]
    if not 0 <= slot <= big - b:
        raise ValueError(f"{slot=}: rows [{slot}, {slot + b}) of a prefix of {b} sequences "
                         f"do not fit a decode state of {big}")
    if cache_length(prefix) > cache_length(cache):
        raise ValueError(f"the prefix holds {cache_length(prefix)} positions per row, the "
                         f"decode state {cache_length(cache)}: size the state for the "
                         "longest sequence (init_cache(batch, length))")
    return _write_rows(prefix, cache, np.int32(slot))


def _lengths(lengths, batch: int, time: int) -> np.ndarray:
    """Valid positions per row as <int32>[B] on the host (default: all ``time``)."""
    if lengths is None:
        return np.full((batch,), time, np.int32)
    out = np.asarray(lengths, np.int32)
    if out.shape != (batch,) or out.min() < 0 or out.max() > time:
        raise ValueError(f"lengths {out.tolist()} must be {batch} counts in [0, {time}]")
    return out


class EndEngine:
    """The end side of a split: embed + layers ``[0, s)`` (resident experts, group gates)
    + encode, on the end mesh.

    Args:
      stages: the split's jitted stages (:func:`~.stages.build_stages` with side "both"
        or "end").
      timer: ``timer(name, fn, *args) -> (out, seconds)`` around every stage call.
    """

    def __init__(self, stages: Stages, timer: Timer = measured):
        stages._check_side("end")
        self.stages, self.timer = stages, timer

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.stages.end_mesh

    def init_cache(self, batch: int, length: int | None = None, dtype=None):
        """Zeroed KV cache of layers ``[0, s)`` for ``batch`` sequences of up to ``length``
        positions (default ``max_seq_len``), keys/values in ``dtype`` (default the model's),
        on the end mesh."""
        return self.stages.init_cache("end", batch, length, dtype)

    def message_bytes(self, batch: int, time: int, *, scoring: bool = False) -> int:
        """Exact wire bytes of the message this side sends for ``[batch, time]`` positions:
        the encoded boundary state (token ids at split 0) plus, when ``scoring`` at a split,
        the T target ids travelling with it (split 0 sends the ids once: inputs and targets
        overlap); 0 at split L (nothing crosses). Every size is linear in ``batch * time``
        past one header, so ragged rows count as ``(1, sum of lengths)``."""
        s = self.stages
        if s.end_only:
            return 0
        extra = TOKEN_BYTES * batch * time if scoring and not s.cloud_only else 0
        return s.up_bytes(batch, time) + extra

    def score(self, rows) -> tuple[Message | Scores, float]:
        """The end's part of scoring ``rows`` <int32>[B, T + 1] (inputs ``rows[:, :-1]``,
        targets ``rows[:, 1:]``).

        Returns:
          ``(out, seconds)``: a :class:`Message` with the targets for the cloud, or at split L
          the final :class:`Scores`. Split 0 computes nothing (0 s).
        """
        s, b, t = self.stages, rows.shape[0], rows.shape[1] - 1
        x, y = rows[:, :-1], rows[:, 1:]
        if s.cloud_only:
            return Message(x, y, self.message_bytes(b, t, scoring=True)), 0.0
        if s.end_only:
            (logits, logp), dt = self.timer("end", s.score_end, s.end_params, s.end_extra,
                                            hop(x, self.mesh), hop(y, self.mesh))
            return Scores(logp, logits, 0), dt
        msg, dt = self.timer("end", s.score_end, s.end_params, s.end_extra, hop(x, self.mesh),
                             None)
        return Message(msg, y, self.message_bytes(b, t, scoring=True)), dt

    def prefill(self, cache, prompts, rng: jax.Array, lengths=None
                ) -> tuple[Any, Message | Sample, float]:
        """Runs the prompts <int32>[B, P] through the end layers, filling ``cache`` (not
        donated: a zeroed cache can be reused). ``lengths`` <int32>[B]: valid tokens of each
        right-padded row (default all P); each row's cache advances by its length.

        Returns:
          ``(cache, out, seconds)``: ``out`` is the :class:`Message` for the cloud (carrying
          ``lengths``), or at split L the first sampled token (:class:`Sample`, sampled with
          ``rng`` at each row's last valid position).
        """
        b, p = np.shape(prompts)
        return self._decode("prefill", cache, prompts, _lengths(lengths, b, p), rng)

    def step(self, cache, token, rng: jax.Array, active=None
             ) -> tuple[Any, Message | Sample, float]:
        """One decode step from the last token <int32>[B] (the cloud's reply, or at split L
        the end's own sample), appending to ``cache`` (donated). ``active`` <bool>[B]: rows
        that advance (default all; see the module docstring). Returns as :meth:`prefill`."""
        b = np.shape(token)[0]
        n = _lengths(None if active is None else np.asarray(active, np.int32), b, 1)
        return self._decode("step", cache, token[:, None], n, rng)

    def _decode(self, kind: str, cache, tokens, lengths: np.ndarray, rng):
        s, b, t = self.stages, tokens.shape[0], tokens.shape[1]
        full = bool(np.all(lengths == t))
        nbytes = self.message_bytes(b, t) if full else self.message_bytes(1, int(lengths.sum()))
        if s.cloud_only:
            return cache, Message(tokens, None, nbytes, lengths), 0.0
        fn = s.prefill_end if kind == "prefill" else s.step_end
        (cache, out), dt = self.timer(f"end_{kind}", fn, s.end_params, s.end_extra, cache,
                                      hop(tokens, self.mesh), hop(lengths, self.mesh), rng)
        if s.end_only:
            return cache, Sample(out[0], out[1], 0), dt
        return cache, Message(out, None, nbytes, lengths), dt


class CloudEngine:
    """The cloud side of a split: decode + layers ``[s, L)`` (every expert, sharded over
    the cloud mesh's 'expert' axis) + head + sampling, on the cloud mesh.

    Args:
      stages: the split's jitted stages (:func:`~.stages.build_stages` with side "both"
        or "cloud").
      timer: ``timer(name, fn, *args) -> (out, seconds)`` around the hop and every stage
        call.
    """

    def __init__(self, stages: Stages, timer: Timer = measured):
        stages._check_side("cloud")
        self.stages, self.timer = stages, timer

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self.stages.cloud_mesh

    def init_cache(self, batch: int, length: int | None = None, dtype=None):
        """Zeroed KV cache of layers ``[s, L)`` for ``batch`` sequences of up to ``length``
        positions (default ``max_seq_len``), keys/values in ``dtype`` (default the model's),
        on the cloud mesh."""
        return self.stages.init_cache("cloud", batch, length, dtype)

    @staticmethod
    def reply_bytes(batch: int, time: int) -> int:
        """Exact wire bytes of a reply of [batch, time] float32 scores or token ids."""
        return token_message_bytes(batch, time)

    def score(self, message: Message) -> tuple[Scores, float]:
        """Scores the message's targets <int32>[B, T] from its boundary state; returns
        (:class:`Scores`, seconds charged: hop + cloud)."""
        s = self.stages
        (payload, targets), dt_hop = self.timer("hop", hop, (message.payload, message.targets),
                                                self.mesh)
        (logits, logp), dt = self.timer("cloud", s.score_cloud, s.cloud_params, s.cloud_codec,
                                        payload, targets)
        b, t = np.shape(message.targets)
        return Scores(logp, logits, self.reply_bytes(b, t)), dt_hop + dt

    def prefill(self, cache, message: Message, rng: jax.Array) -> tuple[Any, Sample, float]:
        """Runs a prefill message (P positions, its rows right-padded past
        ``message.lengths``) through the cloud layers, filling ``cache`` (not donated), and
        samples the first token at each row's last valid position with ``rng``; returns
        ``(cache, Sample, seconds charged: hop + cloud)``."""
        return self._decode("prefill", cache, message, rng)

    def step(self, cache, message: Message, rng: jax.Array) -> tuple[Any, Sample, float]:
        """One decode step from the end's message (one position; rows whose
        ``message.lengths`` is 0 idle), appending to ``cache`` (donated); returns as
        :meth:`prefill`."""
        return self._decode("step", cache, message, rng)

    def generate(self, cache, token, rng: jax.Array, active=None
                 ) -> tuple[Any, Sample, float]:
        """One decode step fed by the cloud's own last token <int32>[B] (split 0: the tokens
        stream down, nothing comes up, no hop); ``cache`` donated; ``active`` <bool>[B] rows
        that advance (default all). Returns as :meth:`prefill`."""
        s, b = self.stages, np.shape(token)[0]
        n = _lengths(None if active is None else np.asarray(active, np.int32), b, 1)
        (cache, (tok, logits)), dt = self.timer(
            "cloud_step", s.step_cloud, s.cloud_params, s.cloud_codec, cache,
            token[:, None], hop(n, self.mesh), rng)
        return cache, Sample(tok, logits, self.reply_bytes(b, 1)), dt

    def _decode(self, kind: str, cache, message: Message, rng):
        s = self.stages
        payload, dt_hop = self.timer("hop", hop, message.payload, self.mesh)
        t = np.shape(jax.tree.leaves(message.payload)[0])[1]
        n = hop(_lengths(message.lengths, message.batch, t), self.mesh)
        fn = s.prefill_cloud if kind == "prefill" else s.step_cloud
        (cache, (tok, logits)), dt = self.timer(f"cloud_{kind}", fn, s.cloud_params,
                                                s.cloud_codec, cache, payload, n, rng)
        return cache, Sample(tok, logits, self.reply_bytes(message.batch, 1)), dt_hop + dt
