"""The cloud server: layers ``[s, L)`` + head for any split a session asks for, over gRPC
(``grpc.aio``), with continuous batching, bounded KV slots, deadlines, keepalive, health,
live statistics and Prometheus metrics.

Concurrency: the asyncio loop serves every RPC (validation, wire decoding, health, Stats) and
never computes; one compute thread owns the devices (:class:`~.worker.CloudWorker`). The
batcher (one task) feeds that thread: after each compute call it takes one queued job (a
prefill, a score, a slot release) and then, per group, one batched decode step of every
session that has a step waiting, once all of the group's live sessions have one or the
oldest has waited ``batch_wait_s``. By default that wait is 0: whatever is waiting runs as
soon as the compute thread is free, and steps that arrive during a step join the next one
(continuous batching as vLLM and JetStream do it; split sessions' steps arrive out of
phase, one round trip apart, and a 3 ms window cost each of them up to 3 ms while the
measured batches stayed small: 1.0-2.4 sessions per step at 2-8 wifi clients,
results/serving_batch_wait_3ms.json). A prompt therefore delays decoding by at most one
prefill, and a slow client never blocks the others.

Limits: at most ``slots`` sessions (``RESOURCE_EXHAUSTED`` beyond, never a queue);
messages up to :func:`~.protocol.message_limit`; payload sizes checked against the model's
:class:`~ec2moe_jax.codec.wire.WireLimits` before decoding. A session is freed when closed,
when its decode stream is cancelled (deadline, client gone: keepalive notices a silent
peer) or after ``ttl_s`` without a request. Binds 127.0.0.1 unless told otherwise; a
non-loopback bind needs ``allow_remote`` plus TLS or a shared token, and the token is
checked by an interceptor before a handler (so before any tensor) sees the request.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import math
import secrets
import statistics
import sys
import time
from collections.abc import Callable

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ec2moe_jax.codec import CodecSpec, wire
from ec2moe_jax.serving import protocol
from ec2moe_jax.serving.metrics import Metrics
from ec2moe_jax.serving.protocol import pb, pb_grpc
from ec2moe_jax.serving.worker import CloudWorker, GroupKey

SERVICE = "ec2moe.serving.v1.Cloud"


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """How the server listens and what it admits.

    Attributes:
      host, port: the bind address (port 0: a free one, reported once bound).
      slots: sessions (KV cache rows) held at once.
      ttl_s: a session without a request for this long is freed.
      batch_wait_s: how long a decode step may wait for the rest of its group's sessions
        (0: none; steps arriving during a step join the next one).
      max_score_batch: rows of one scoring request.
      token: shared secret every call must carry (``authorization: Bearer <token>``).
      tls: (certificate chain, private key) PEM bytes, or None.
      allow_remote: permits a non-loopback ``host`` (with ``token`` or ``tls``).
      metrics_port: Prometheus exporter port (None: off; 0: a free one).

    Raises:
      ValueError: a non-positive count or time, or a non-loopback bind without
        ``allow_remote`` and TLS or a token (the message names the host and the flags).
    """

    host: str = "127.0.0.1"
    port: int = 0
    slots: int = 8
    ttl_s: float = 30.0
    batch_wait_s: float = 0.0
    max_score_batch: int = 4
    token: str | None = None
    tls: tuple[bytes, bytes] | None = None
    allow_remote: bool = False
    metrics_port: int | None = None

    def __post_init__(self):
        for name in ("slots", "max_score_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not (self.ttl_s > 0 and self.batch_wait_s >= 0 and math.isfinite(self.ttl_s)):
            raise ValueError(f"ttl_s={self.ttl_s} must be > 0 and batch_wait_s="
                             f"{self.batch_wait_s} >= 0")
        if not protocol.is_loopback(self.host):
            if not self.allow_remote:
                raise ValueError(f"binding {self.host!r} exposes the server beyond this "
                                 "machine; pass --allow-remote (with --auth-token-file or "
                                 "--tls-cert/--tls-key), or bind 127.0.0.1")
            if not (self.token or self.tls):
                raise ValueError(f"a non-loopback bind ({self.host!r}) needs authentication: "
                                 "--auth-token-file FILE and/or --tls-cert/--tls-key")
        if self.token is not None and len(self.token) < 16:
            raise ValueError(f"the shared token is {len(self.token)} characters; use at "
                             "least 16 (e.g. `python -c 'import secrets; "
                             "print(secrets.token_hex(16))'`)")


@dataclasses.dataclass(eq=False)
class Session:
    id: str
    key: GroupKey
    spec: CodecSpec | None  # None at split 0
    seen: float
    position: int = 0  # positions held in the KV row
    last_token: int | None = None
    busy: int = 0  # calls in flight
    closed: bool = False
    want: int = 0  # cloud-only: tokens the server still feeds itself
    out: asyncio.Queue | None = None  # cloud-only: (token, position, seconds, rows) per step
    fed_at: float = 0.0  # when the session's last token came out


@dataclasses.dataclass(eq=False)
class _Step:
    session: Session
    msg: object
    future: asyncio.Future
    queued: float


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class CloudServer:
    """The service and its batcher around a :class:`~.worker.CloudWorker`.

    Args:
      worker: the cloud side (groups, pools, stages).
      fingerprint: the parameters' fingerprint sessions must match.
      codec_fingerprint: ``(split, spec) -> fingerprint`` of the codec the server would use.
      options: :class:`ServeOptions`.
    """

    def __init__(self, worker: CloudWorker, fingerprint: str,
                 codec_fingerprint: Callable[[int, CodecSpec], str], options: ServeOptions):
        cfg = worker.model.cfg
        self.worker, self.fingerprint, self.options = worker, fingerprint, options
        self.codec_fingerprint = codec_fingerprint
        self.num_layers, self.max_seq_len = cfg.num_layers, worker.max_seq_len
        self.d_model, self.vocab_size = cfg.d_model, cfg.vocab_size
        self.limits = wire.WireLimits.for_model(cfg.d_model, self.max_seq_len,
                                                options.max_score_batch)
        self.message_limit = protocol.message_limit(cfg.d_model, self.max_seq_len,
                                                    options.max_score_batch)
        self.sessions: dict[str, Session] = {}
        self.pending: dict[GroupKey, dict[str, _Step]] = collections.defaultdict(dict)
        self.feeding: dict[GroupKey, dict[str, Session]] = collections.defaultdict(dict)
        self.jobs: collections.deque = collections.deque()
        self.compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compute")
        self.metrics = Metrics(options.slots)
        self.step_times: collections.deque = collections.deque(maxlen=64)
        self.prefill_times: collections.deque = collections.deque(maxlen=64)
        self.rows: collections.deque = collections.deque(maxlen=64)
        self.cycles: collections.deque = collections.deque(maxlen=64)
        self.step_walls: collections.deque = collections.deque(maxlen=64)
        self._last_feed: dict[GroupKey, tuple[float, int]] = {}  # (start, steps so far)
        self.steps = self.tokens = 0
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []

    # ----- plumbing -----------------------------------------------------------------------

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _session(self, sid: str) -> Session:
        s = self.sessions.get(sid)
        if s is None or s.closed:
            raise _Abort(grpc.StatusCode.NOT_FOUND, f"session {sid!r} is unknown to this server "
                         "(closed, expired after its TTL, or opened before a restart): open a "
                         "new one and replay the history")
        s.seen = time.monotonic()
        return s

    def _decode(self, buf: bytes, spec: CodecSpec | None, *, batch, time_):
        try:
            return protocol.decode_state(buf, spec, d_model=self.d_model,
                                         vocab_size=self.vocab_size, batch=batch,
                                         time=time_, limits=self.limits)
        except wire.WireFormatError as e:
            self.metrics.rejected.inc()
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad payload: {e}") from None

    async def _plan(self, plan, fingerprint: str, codec_fp: str
                    ) -> tuple[GroupKey, CodecSpec | None]:
        """Checks a client's plan and identity; returns its group key and codec."""
        if fingerprint != self.fingerprint:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"checkpoint fingerprint {fingerprint!r} differs from the server's "
                         f"{self.fingerprint!r}: the end and the cloud must load the same "
                         "workdir")
        split = int(plan.split)
        if not 0 <= split < self.num_layers:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"split={split} out of range: this server runs layers [split, L) of "
                         f"an L={self.num_layers} model, so split must lie in [0, "
                         f"{self.num_layers - 1}] (split {self.num_layers} is end-only)")
        if split == 0:
            return (0, "bf16", 0.0), None
        try:
            spec = CodecSpec.parse(plan.codec).check(self.d_model)
        except ValueError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        try:
            mine = await self._job(self.codec_fingerprint, split, spec)
        except _Abort as e:  # no codec for this split and rank in the workdir
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, e.message) from None
        if codec_fp != mine:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"codec {spec.name} at split {split}: the client's weights "
                         f"{codec_fp!r} differ from the server's {mine!r}")
        return (split, spec.name, 0.0), spec

    # ----- RPCs ---------------------------------------------------------------------------

    async def Open(self, request, context):
        return await self._guard(context, self._open, request)

    async def _open(self, request):
        return pb.OpenReply(session=await self._admit(request), num_layers=self.num_layers,
                            max_seq_len=self.max_seq_len, ttl_s=self.options.ttl_s)

    async def _admit(self, request) -> str:
        """Checks an OpenRequest, takes a slot and returns the new session's id."""
        key, spec = await self._plan(request.plan, request.fingerprint, request.codec_fingerprint)
        t = request.temperature
        if not (math.isfinite(t) and t >= 0):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"temperature={t} must be finite and >= 0 (0 = greedy)")
        key = (key[0], key[1], float(t))
        live = sum(not s.closed for s in self.sessions.values())
        if live >= self.options.slots:
            self.metrics.refused.inc()
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"all {self.options.slots} KV slots are taken; retry later")
        sid = secrets.token_hex(16)
        s = Session(sid, key, spec, time.monotonic(), busy=1)
        self.sessions[sid] = s  # holds the slot from now on
        try:
            await self._job(self.worker.admit, key, sid)  # first use: builds the split
        except BaseException:
            self.sessions.pop(sid, None)
            raise
        s.busy, s.seen = 0, time.monotonic()
        self.metrics.sessions.set(len(self.sessions))
        return sid

    async def Prefill(self, request, context):
        return await self._guard(context, self._prefill, request)

    async def _prefill(self, request):
        if not request.session and request.HasField("open"):
            request.session = await self._admit(request.open)
            try:
                return await self._prefill_session(request)
            except BaseException:  # a session opened for a refused prompt is not kept
                s = self.sessions.get(request.session)
                if s is not None:
                    await self._close(s)
                raise
        return await self._prefill_session(request)

    async def _prefill_session(self, request):
        s = self._session(request.session)
        if s.last_token is not None:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"session {s.id} is already prefilled; open a new one to replay")
        msg = self._decode(request.payload, s.spec, batch=1, time_=None)
        length = int(np.shape(msg if s.spec is None else msg[next(iter(msg))])[1])
        if length > self.max_seq_len:
            raise _Abort(grpc.StatusCode.OUT_OF_RANGE,
                         f"a {length}-position prompt exceeds the server's session length "
                         f"{self.max_seq_len} (ec2moe serve --cache-len)")
        t0 = time.monotonic()
        s.busy += 1
        try:
            token, dt = await self._job(self.worker.prefill, s.key, s.id, msg, length)
        finally:
            s.busy -= 1
        s.position, s.last_token = length, token
        self.prefill_times.append(dt)
        self.metrics.prefill.observe(dt)
        self.tokens += 1
        return pb.TokenReply(token=token, position=length, queue_s=time.monotonic() - t0 - dt,
                             compute_s=dt, batch=1, session=s.id)

    async def Decode(self, request_iterator, context):
        # A stream that ends without a detaching Step, or is cancelled (deadline, a vanished
        # client: grpc.aio reports a lost peer as the end of the requests), frees its session.
        session, detached = None, False
        try:
            async for step in request_iterator:
                try:
                    if session is None:
                        session = self._session(step.session)
                        session.busy += 1
                    elif step.session and step.session != session.id:
                        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"one stream serves one session ({session.id}); got "
                                     f"{step.session!r}")
                    if step.detach:
                        detached = True
                        continue
                    async for reply in self._steps(session, step):
                        yield reply
                except _Abort as e:
                    self.metrics.errors.labels(e.code.name).inc()
                    await context.abort(e.code, e.message)
        finally:
            if session is not None:
                session.busy -= 1
                session.seen = time.monotonic()
                if not detached:
                    await asyncio.shield(self._close(session))

    async def _steps(self, s: Session, step):
        if s.last_token is None:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                         f"session {s.id} has no prompt yet: call Prefill first")
        if s.spec is None:  # cloud-only: the server feeds its own samples back
            n, msgs = int(step.tokens), None
            if n < 1 or s.position + n > self.max_seq_len:
                raise _Abort(grpc.StatusCode.OUT_OF_RANGE,
                             f"tokens={n} from position {s.position} must be >= 1 and end "
                             f"within the session length {self.max_seq_len}")
        else:
            if s.position + 1 > self.max_seq_len:
                raise _Abort(grpc.StatusCode.OUT_OF_RANGE,
                             f"position {s.position} is the session length (--cache-len)")
            n, msgs = 1, self._decode(step.payload, s.spec, batch=1, time_=1)
        if msgs is None:  # the batcher steps the session until it has fed n tokens
            s.out = s.out or asyncio.Queue()
            s.want, s.fed_at = s.want + n, time.monotonic()
            self.feeding[s.key][s.id] = s
            self._poke()
            for _ in range(n):
                item = await s.out.get()
                if isinstance(item, Exception):
                    raise item
                token, position, wait, dt, rows = item
                yield pb.TokenReply(token=token, position=position, queue_s=wait,
                                    compute_s=dt, batch=rows)
            return
        t0 = time.monotonic()
        fut = asyncio.get_running_loop().create_future()
        self.pending[s.key][s.id] = _Step(s, msgs, fut, t0)
        self._poke()
        token, dt, rows = await fut
        s.position += 1
        s.last_token, s.seen = token, time.monotonic()
        yield pb.TokenReply(token=token, position=s.position,
                            queue_s=time.monotonic() - t0 - dt, compute_s=dt, batch=rows)

    async def Score(self, request, context):
        return await self._guard(context, self._score, request)

    async def _score(self, request):
        key, spec = await self._plan(request.plan, request.fingerprint, request.codec_fingerprint)
        msg = self._decode(request.payload, spec, batch=None, time_=None)
        b, t = np.shape(msg if spec is None else msg[next(iter(msg))])[:2]
        try:
            targets = protocol.decode_state(request.targets, None, d_model=self.d_model,
                                            vocab_size=self.vocab_size, batch=b, time=t,
                                            limits=self.limits)
        except wire.WireFormatError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad targets: {e}") from None
        logp, dt = await self._job(self.worker.score, key, msg, targets)
        return pb.ScoreReply(logprobs=wire.pack(logp[..., None].astype(np.float32), None,
                                                "float32"), compute_s=dt)

    async def Close(self, request, context):
        return await self._guard(context, self._close_rpc, request)

    async def _close_rpc(self, request):
        s = self.sessions.get(request.session)
        if s is not None:
            await self._close(s)
        return pb.CloseReply()

    async def Stats(self, request, context):
        return self.stats()

    def stats(self) -> pb.StatsReply:
        med = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
        return pb.StatsReply(
            queue=(sum(len(p) for p in self.pending.values()) + len(self.jobs)
                   + sum(len(f) for f in self.feeding.values())),
            step_s=med(self.step_times), sessions=len(self.sessions), slots=self.options.slots,
            occupancy=float(np.mean(self.rows)) if self.rows else 0.0, steps=self.steps,
            tokens=self.tokens, prefill_s=med(self.prefill_times), cycle_s=med(self.cycles),
            step_wall_s=med(self.step_walls),
            compiled=self.metrics.compiles)

    # ----- errors -------------------------------------------------------------------------

    async def _guard(self, context, fn, *args):
        try:
            return await fn(*args)
        except _Abort as e:
            self.metrics.errors.labels(e.code.name).inc()
            await context.abort(e.code, e.message)

    # ----- sessions and batching ----------------------------------------------------------

    async def _close(self, s: Session) -> None:
        if s.closed:
            return
        s.closed = True
        self.pending[s.key].pop(s.id, None)
        self.feeding[s.key].pop(s.id, None)
        self.sessions.pop(s.id, None)
        self.metrics.sessions.set(len(self.sessions))
        await self._job(self.worker.release, s.key, s.id)

    async def _job(self, fn, *args):
        fut = asyncio.get_running_loop().create_future()
        self.jobs.append((fn, args, fut))
        self._poke()
        return await fut

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.options.ttl_s / 4))
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if not s.busy and now - s.seen > self.options.ttl_s:
                    self.metrics.expired.inc()
                    await self._close(s)

    async def _batcher(self) -> None:
        while True:
            try:
                await self._batch_once()
            except Exception as e:  # a bug must not stop every session: say so, go on
                log(f"batcher error (serving on): {type(e).__name__}: {e}")
                self.metrics.errors.labels("BATCHER").inc()

    async def _batch_once(self) -> None:
        """Waits for work, runs one queued job, then one decode round."""
        await self._wake.wait()
        self._wake.clear()
        if self.jobs:
            fn, args, fut = self.jobs.popleft()
            try:
                out = await self._run(fn, *args)
                if not fut.done():
                    fut.set_result(out)
            except Exception as e:  # reported to the caller, the server keeps serving
                # A ValueError is a documented refusal (no codec saved for the plan, a
                # bad shape); anything else is the server's fault.
                code = (grpc.StatusCode.FAILED_PRECONDITION if isinstance(e, ValueError)
                        else grpc.StatusCode.INTERNAL)
                if not fut.done():
                    fut.set_exception(_Abort(code, f"{type(e).__name__}: {e}"))
        delay = await self._decode_round()
        if self.jobs or delay == 0.0:
            self._wake.set()
        elif delay is not None:
            asyncio.get_running_loop().call_later(delay, self._wake.set)

    async def _decode_round(self) -> float | None:
        """Runs each group whose batch is ready; returns how long until the next group is
        due (0: now, None: nothing waiting). Cloud-only sessions being fed are always ready;
        a split group waits for its sessions' payloads up to ``batch_wait_s``."""
        soonest, now = None, time.monotonic()
        for key in list(self.feeding):
            if self.feeding[key]:
                await self._feed(key)
                soonest = 0.0 if self.feeding[key] else soonest
        for key, steps in list(self.pending.items()):
            live = [s for s in steps.values() if not s.future.done()]
            if not live:
                steps.clear()
                continue
            rows = len(self.worker.groups[key].rows)
            due = min(s.queued for s in live) + self.options.batch_wait_s
            if len(live) < rows and due > now:
                soonest = due - now if soonest is None else min(soonest, due - now)
                continue
            batch = {s.session.id: s for s in live}
            steps.clear()
            result = await self._step(key, {k: s.msg for k, s in batch.items()})
            for sid, s in batch.items():
                if s.future.done():
                    continue
                if isinstance(result, Exception):
                    s.future.set_exception(result)
                else:
                    s.future.set_result((result[0][sid], result[1], len(batch)))
            soonest = 0.0 if any(self.pending.values()) else soonest
        self.metrics.queue.set(sum(len(p) for p in self.pending.values()) + len(self.jobs))
        return soonest

    async def _step(self, key: GroupKey, msgs: dict):
        """One batched step on the compute thread: ({session: token}, seconds) or the
        error (an _Abort) to report to its sessions."""
        t0 = time.monotonic()
        try:
            tokens, dt = await self._run(self.worker.step, key, msgs)
        except Exception as e:
            return _Abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        self.step_walls.append(time.monotonic() - t0)
        self.steps += 1
        self.tokens += len(msgs)
        self.step_times.append(dt)
        self.rows.append(len(msgs))
        self.metrics.step.observe(dt)
        self.metrics.batch_rows.observe(len(msgs))
        return tokens, dt

    async def _feed(self, key: GroupKey) -> None:
        """One step of the cloud-only sessions of ``key`` being fed their own samples."""
        feeders = dict(self.feeding[key])
        start = time.monotonic()
        last, steps = self._last_feed.get(key, (0.0, -1))
        if steps == self.steps:  # back to back with this group's previous step: one cycle
            self.cycles.append(start - last)
        self._last_feed[key] = (start, self.steps + 1)
        result = await self._step(key, {sid: np.array([[s.last_token]], np.int32)
                                        for sid, s in feeders.items()})
        done = time.monotonic()
        for sid, s in feeders.items():
            if s.closed:
                continue
            if isinstance(result, Exception):  # the session's stream ends with the error
                self.feeding[key].pop(sid, None)
                s.want = 0
                s.out.put_nowait(result)
                continue
            s.position, s.last_token, s.want = s.position + 1, result[0][sid], s.want - 1
            s.out.put_nowait((s.last_token, s.position, start - s.fed_at, result[1],
                              len(feeders)))
            s.fed_at = s.seen = done
            if s.want == 0:
                self.feeding[key].pop(sid, None)

    async def start(self) -> tuple[grpc.aio.Server, int]:
        """Binds, starts the batcher, TTL sweeper and health service; returns (server,
        port).

        Raises:
          ValueError: the address cannot be bound (in use, or not this machine's).
        """
        self._wake = asyncio.Event()
        self._tasks = [asyncio.ensure_future(self._batcher()),
                       asyncio.ensure_future(self._expire())]
        token = self.options.token
        interceptors = [] if token is None else [protocol.TokenCheck(token)]
        server = grpc.aio.server(options=protocol.channel_options(self.message_limit,
                                                                 server=True),
                                 interceptors=interceptors)
        pb_grpc.add_CloudServicer_to_server(self, server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.options.host}:{self.options.port}"
        try:
            if self.options.tls is not None:
                cert, key = self.options.tls
                port = server.add_secure_port(address,
                                              grpc.ssl_server_credentials([(key, cert)]))
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if not port:
            raise ValueError(f"cannot listen on {address} (in use, or not an address of this "
                             "machine): choose another --port (0 picks a free one) or --host")
        await server.start()
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.options.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.options.host,
                                                   self.options.metrics_port)
        return server, port

    async def stop(self, server: grpc.aio.Server, grace_s: float = 1.0) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(grace_s)
        for t in self._tasks:
            t.cancel()
        self.compute.shutdown(wait=False, cancel_futures=True)


def log(message: str) -> None:
    print(f"ec2moe serve: {message}", file=sys.stderr, flush=True)
