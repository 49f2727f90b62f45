"""The cloud side of the server, synchronous: one thread owns every device array.

Shape legend: C slot rows of a group (a bucket capacity), P prompt length, Pb padded prompt
length, M cache length (the server's ``cache_len``, at most ``max_seq_len``), R values per
token, V vocab.

Sessions are grouped by what their decode step compiles to: (split, codec, temperature).
Each group has a :class:`~ec2moe_jax.pipeline.engine.CloudEngine` over stages built once for
the cloud side only (``build_stages(..., side="cloud")`` from parameters placed once on the
cloud mesh) and a KV slot pool of C rows, C a bucket capacity (1, 2, 4, ...): live sessions
occupy rows ``[0, n)`` (a freed row takes the last live row: compaction), and the pool is
reallocated to the next capacity when it fills and to a smaller one when at most a quarter
of it is live. Every batched decode step runs all C rows with an active-row mask (the
engine's per-row positions; idle rows do not advance), so the programs a server compiles are
one step and one insert per (group, capacity), one prefill per (group, padded prompt length),
one score per (group, padded shape): a new request of a seen bucket compiles nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from ec2moe_jax.codec import CodecSpec, wire
from ec2moe_jax.models.lm import cache_bucket
from ec2moe_jax.pipeline.engine import CloudEngine, Message, insert
from ec2moe_jax.pipeline.stages import build_stages
from ec2moe_jax.serving import protocol
from ec2moe_jax.sharding import batch_sharding, replicated

GroupKey = tuple[int, str, float]  # (split, codec name, temperature)


def capacities(slots: int) -> list[int]:
    """Bucket capacities of a slot pool: powers of two below ``slots``, then ``slots``."""
    out, c = [], 1
    while c < slots:
        out.append(c)
        c *= 2
    return [*out, slots]


@dataclasses.dataclass
class Group:
    """One (split, codec, temperature) group: its engine, pool and row table."""

    key: GroupKey
    spec: CodecSpec | None  # None at split 0 (token ids travel)
    engine: CloudEngine
    cache: object = None  # KV cache of C rows, or None while empty
    rows: list = dataclasses.field(default_factory=list)  # session id per live row

    @property
    def capacity(self) -> int:
        return 0 if self.cache is None else len(np.asarray(_positions(self.cache)))


def _positions(cache):
    """<int32>[C] rows' positions (any layer's index: they agree)."""
    for layer in cache.values():
        return layer["attn"]["cache_index"]
    raise ValueError("a split-L group holds no layers; the server serves splits < L")


def _pad_time(payload, t: int):
    """Right-pads a [1, P, ...] message (ids, or a dict of arrays) along T to ``t``."""

    def one(a):
        a = np.asarray(a)
        pad = [(0, 0)] * a.ndim
        pad[1] = (0, t - a.shape[1])
        return np.pad(a, pad)

    return jax.tree.map(one, payload)


def _stack_rows(inputs: dict[int, object], capacity: int):
    """One [C, 1, ...] step message from per-row [1, 1, ...] messages (at least one); idle
    rows zero."""

    def stack(*leaves):
        first = np.asarray(leaves[0])
        out = np.zeros((capacity, *first.shape[1:]), first.dtype)
        for row, leaf in zip(inputs, leaves, strict=True):
            out[row] = np.asarray(leaf)[0]
        return out

    return jax.tree.map(stack, *[inputs[r] for r in inputs])


def _on_mesh(tree, mesh):
    """Host arrays as global arrays of ``mesh``, placed as :func:`~ec2moe_jax.sharding.hop`
    places them (B over 'data' where it divides), without the cross-process equality check
    that ``jax.device_put`` makes of a host array in a cloud of several processes (one
    collective per array): every process got these values from process 0's one broadcast
    (:mod:`.distributed`). Used only when ``jax.process_count() > 1``."""

    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim, x.shape[0] if x.ndim else None)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


class CloudWorker:
    """The cloud side's groups and pools (see the module docstring). Not thread-safe: call
    it from one thread (the server's compute thread).

    Args:
      model: the LM.
      params: its parameters placed once on ``mesh`` (shared by every split's stages).
      mesh: the cloud mesh.
      slots: the most rows a group's pool holds (the server admits at most this many
        sessions in all).
      codec_for: ``(split, spec) -> codec weights or None`` (the workdir's link codec).
      cache_len: positions a session may hold (M of every slot row; default and maximum the
        model's ``max_seq_len``): a server for short sessions keeps its steps cheap.
      seed: the sampling key of temperature > 0 groups.

    Raises:
      ValueError: ``cache_len`` outside [1, max_seq_len].
    """

    def __init__(self, model, params, mesh, *, slots: int,
                 codec_for: Callable[[int, CodecSpec], dict | None],
                 cache_len: int | None = None, seed: int = 0):
        self.model, self.params, self.mesh, self.slots = model, params, mesh, slots
        limit = model.cfg.max_seq_len
        self.cache_len = limit if cache_len is None else cache_len
        if not 1 <= self.cache_len <= limit:
            raise ValueError(f"cache_len={self.cache_len} must lie in [1, max_seq_len={limit}]")
        self.codec_for = codec_for
        self.groups: dict[GroupKey, Group] = {}
        self.rng = jax.random.key(seed)
        self.capacities = capacities(slots)
        # Several processes (jax.distributed): inputs go onto the global mesh directly.
        self.place = ((lambda tree: _on_mesh(tree, mesh)) if jax.process_count() > 1
                      else (lambda tree: tree))

    @property
    def max_seq_len(self) -> int:
        """Positions a session may hold (``cache_len``)."""
        return self.cache_len

    def _key(self):
        self.rng, sub = jax.random.split(self.rng)
        if jax.process_count() > 1:  # the same key on every process, placed without a check
            data = np.asarray(jax.random.key_data(sub))
            return jax.random.wrap_key_data(jax.make_array_from_callback(
                data.shape, replicated(self.mesh), lambda index: data[index]))
        return sub

    def group(self, key: GroupKey) -> Group:
        """The group of ``key`` (its stages built on first use: seconds, then compiled per
        shape as requests come)."""
        if key not in self.groups:
            split, name, temperature = key
            spec = CodecSpec.parse(name).check(self.model.cfg.d_model)
            codec = self.codec_for(split, spec) if split > 0 else None
            stages = build_stages(self.model, self.params, None, self.mesh, split=split,
                                  transport=spec, codec=codec, temperature=temperature,
                                  side="cloud")
            self.groups[key] = Group(key, None if split == 0 else spec, CloudEngine(stages))
        return self.groups[key]

    def _resize(self, g: Group, capacity: int) -> None:
        """Reallocates ``g``'s pool to ``capacity`` rows, keeping rows [0, n)."""
        new = g.engine.init_cache(capacity, self.cache_len)
        n = len(g.rows)
        if g.cache is not None and n:
            keep = min(n, capacity)
            live = jax.tree.map(lambda c: c[:keep], g.cache)
            new = insert(live, new, 0)
        g.cache = new

    def admit(self, key: GroupKey, session: str) -> None:
        """Gives ``session`` a row of its group's pool (growing the pool if full)."""
        g = self.group(key)
        if len(g.rows) >= self.slots:
            raise RuntimeError(f"group {key} already holds {self.slots} sessions")
        if len(g.rows) >= g.capacity:
            self._resize(g, next(c for c in self.capacities if c > len(g.rows)))
        g.rows.append(session)

    def release(self, key: GroupKey, session: str) -> None:
        """Frees ``session``'s row: the last live row moves into it; a pool at most a quarter
        live shrinks (to half) so steps stay the size of the live batch."""
        g = self.groups.get(key)
        if g is None or session not in g.rows:
            return
        i, last = g.rows.index(session), len(g.rows) - 1
        if i != last:
            moved = jax.tree.map(lambda c: c[last:last + 1], g.cache)
            g.cache = insert(moved, g.cache, i)
            g.rows[i] = g.rows[last]
        g.rows.pop()
        if not g.rows:
            g.cache = None
        elif len(g.rows) * 4 <= g.capacity:
            self._resize(g, next(c for c in self.capacities if c >= len(g.rows) * 2))

    def row(self, key: GroupKey, session: str) -> int:
        return self.groups[key].rows.index(session)

    def prefill(self, key: GroupKey, session: str, payload, length: int
                ) -> tuple[int, float]:
        """Runs a session's prompt (or replayed history) of ``length`` positions, a [1, P]
        message, into its row; returns (first new token, seconds)."""
        g = self.groups[key]
        padded = cache_bucket(length, self.max_seq_len)
        prefix = g.engine.init_cache(1, padded)
        msg = Message(self.place(_pad_time(payload, padded)), None, 0,
                      np.array([length], np.int32))
        prefix, sample, dt = g.engine.prefill(prefix, msg, self._key())
        g.cache = insert(prefix, g.cache, g.rows.index(session))
        return int(np.asarray(sample.token)[0]), dt

    def step(self, key: GroupKey, inputs: dict[str, object]) -> tuple[dict[str, int], float]:
        """One batched decode step of ``inputs`` (session -> its [1, 1] message) over the
        group's whole pool, the other rows idle; returns (session -> token, seconds)."""
        g = self.groups[key]
        by_row = {g.rows.index(s): m for s, m in inputs.items()}
        active = np.zeros((g.capacity,), np.int32)
        active[list(by_row)] = 1
        msg = Message(self.place(_stack_rows(by_row, g.capacity)), None, 0, active)
        g.cache, sample, dt = g.engine.step(g.cache, msg, self._key())
        tokens = np.asarray(sample.token)
        return {s: int(tokens[g.rows.index(s)]) for s in inputs}, dt

    def score(self, key: GroupKey, payload, targets: np.ndarray) -> tuple[np.ndarray, float]:
        """Log-probabilities <float32>[B, T] of ``targets`` [B, T] from a [B, T] message
        (T padded to a bucket, so similar requests share one program)."""
        g = self.group(key)
        b, t = targets.shape
        padded = cache_bucket(t, self.max_seq_len)
        msg = Message(self.place(_pad_time(payload, padded)),
                      self.place(_pad_time(targets, padded)), 0)
        scores, dt = g.engine.score(msg)
        return np.asarray(scores.logprobs)[:, :t], dt


def warm_up(worker: CloudWorker, keys: list[GroupKey], prompt_lengths: list[int]) -> None:
    """Compiles the given groups' prefill (per padded prompt length) and batched step (per
    capacity) before the server admits anyone, so first requests do not wait for XLA."""
    for key in keys:
        g = worker.group(key)
        spec = g.spec
        for c in worker.capacities:
            ids = [f"warm{i}" for i in range(c)]
            for sid in ids:
                worker.admit(key, sid)
            for length in prompt_lengths:
                worker.prefill(key, ids[0], _zeros(worker, spec, length), length)
            worker.step(key, {sid: _zeros(worker, spec, 1) for sid in ids})
            for sid in ids:
                worker.release(key, sid)
    jax.effects_barrier()


def _zeros(worker: CloudWorker, spec: CodecSpec | None, t: int):
    """A [1, t] message of zeros in the session's format (what decode_state returns)."""
    d = worker.model.cfg.d_model
    if spec is None:
        return np.zeros((1, t), np.int32)
    buf = wire.pack(np.zeros((1, t, spec.width(d)), np.float32 if not spec.quant_bits
                             else np.int8),
                    np.zeros((1, t), np.float32) if spec.quant_bits else None,
                    spec.wire_kind if (spec.quant_bits or not spec.lowrank) else "float32")
    return protocol.decode_state(buf, spec, d_model=d, vocab_size=worker.model.cfg.vocab_size,
                                 batch=1, time=t, limits=wire.DEFAULT_LIMITS)
