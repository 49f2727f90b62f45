"""The end client: embed + layers ``[0, s)`` (resident experts, group gate) + the codec here,
layers ``[s, L)`` + head on a cloud server over gRPC.

Shape legend: P prompt length, G generated tokens, R values per token, T positions.

Generation keeps a *history*: the token ids, and for a split plan the boundary payload of
every position sent so far (what the end computed; the end's own KV cache stays here). A
lost connection, an expired session or a restarted server is survived by reconnecting with
exponential backoff, opening a new session and **replaying** the history as one prefill, which
rebuilds the server's KV cache; the reply is the next token, so greedy output equals an
uninterrupted run (the replayed positions are recomputed by a prefill instead of steps: the
same values up to float rounding). A cloud-only plan (split 0) sends token ids and lets the
server feed its own samples back: one request streams all remaining tokens.

Every call has a deadline; errors the client cannot recover from raise :class:`ServingError`
with the server's status and message.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Callable

import grpc
import jax
import numpy as np

from ec2moe_jax.serving import protocol
from ec2moe_jax.serving.protocol import pb, pb_grpc


class ServingError(RuntimeError):
    """A call the server refused or the client gave up on; ``code`` is the gRPC status (or
    None when the server could not be reached at all)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Retry:
    """Reconnection policy: waits ``first_s``, doubling up to ``max_s``, for at most
    ``budget_s`` seconds in all per outage."""

    first_s: float = 0.05
    max_s: float = 2.0
    budget_s: float = 60.0


@dataclasses.dataclass
class LinkStats:
    """What the client measured of the link and the server (EMA over replies).

    Attributes:
      rtt_s: reply wall time minus the server's queue and compute time (one round trip plus
        serialisation).
      rtt_sum_s, rtt_count: the total and number of those round trips (not averaged: a
        benchmark takes the mean over a request from their differences).
      up_bps: uplink throughput measured on prefills (payload bits over their transfer time).
      queue_s, compute_s: the server's last reported queue wait and step time.
      bytes_up, bytes_down: protobuf bytes of requests and replies (payloads included).
      end_s: the end stage's compute per decode step (EMA, seconds; 0 at split 0).
      end_prefill_s: the end stage's compute of the last prompt (seconds; 0 at split 0).
      client_step_s: wall time per decode step spent in this process between a reply and
        the next request (end stage, codec, serialisation, the caller's ``on_token``; EMA,
        seconds; 0 at split 0): the end device's whole share of a step.
      reconnects: outages survived.
      events: what each failed attempt saw ("CODE: details"), oldest first.
    """

    rtt_s: float | None = None
    up_bps: float | None = None
    queue_s: float = 0.0
    compute_s: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    end_s: float = 0.0
    end_prefill_s: float = 0.0
    client_step_s: float = 0.0
    rtt_sum_s: float = 0.0
    rtt_count: int = 0
    reconnects: int = 0
    events: list = dataclasses.field(default_factory=list)

    def observe(self, wall_s: float, reply, up_bytes: int = 0, alpha: float = 0.3) -> None:
        net = max(wall_s - reply.queue_s - reply.compute_s, 1e-6)
        self.queue_s, self.compute_s = reply.queue_s, reply.compute_s
        if up_bytes > 4096 and self.rtt_s is not None:  # a prefill: time the transfer
            bps = 8 * up_bytes / max(net - self.rtt_s, 1e-4)
            self.up_bps = bps if self.up_bps is None else (1 - alpha) * self.up_bps + alpha * bps
        elif up_bytes <= 4096:
            self.rtt_s = net if self.rtt_s is None else (1 - alpha) * self.rtt_s + alpha * net
            self.rtt_sum_s += net
            self.rtt_count += 1


class _History:
    """Token ids and, for a split, the payload of every position sent (numpy pytrees)."""

    def __init__(self, prompt: list[int]):
        self.tokens = list(prompt)
        self.chunks: list = []  # boundary payloads, [1, t, ...] each
        self.covered = 0  # positions the chunks cover
        self.end_cache = None

    def payload(self, start: int = 0):
        chunks = self.chunks[start:]
        return jax.tree.map(lambda *a: np.concatenate(a, axis=1), *chunks)


class EndClient:
    """The end side of one plan, talking to one server.

    Args:
      address: ``host:port`` of the server (or of a relay in front of it).
      stages: the plan's stages built for the end side (``build_stages(..., side="end")``;
        any stages at split 0, where the end computes nothing).
      fingerprint: the parameters' fingerprint (:func:`ec2moe_jax.training.workdir.
        params_fingerprint`).
      codec: the link codec weights (None without one).
      temperature: sampling temperature on the server (0 = greedy).
      token: the server's shared token, if it wants one.
      tls_root: PEM of the CA that signed the server's certificate (TLS), or None.
      timeout_s: deadline of every unary call and of each decode step.
      retry: the reconnection policy.
      privacy: refuse to send raw token ids (a split-0 plan).

    Raises:
      ValueError: ``privacy`` with a split-0 plan, or an end-only plan (nothing to serve).
    """

    def __init__(self, address: str, stages, *, fingerprint: str, codec: dict | None = None,
                 temperature: float = 0.0, token: str | None = None,
                 tls_root: bytes | None = None, timeout_s: float = 30.0,
                 retry: Retry = Retry(), privacy: bool = False, seed: int = 0):
        cfg = stages.model.cfg
        self.address, self.cfg, self.privacy = address, cfg, privacy
        self.fingerprint = fingerprint
        self.temperature, self.timeout_s, self.retry = temperature, timeout_s, retry
        self.metadata = protocol.bearer(token) if token else ()
        self.tls_root = tls_root
        self.limit = protocol.message_limit(cfg.d_model, cfg.max_seq_len, 1)
        self.stats = LinkStats()
        self.rng = jax.random.key(seed)
        self.session: str | None = None
        self._channel = self._stub = None
        self._use(stages, codec)

    def _use(self, stages, codec: dict | None) -> None:
        cfg = self.cfg
        if stages.split == 0 and self.privacy:
            raise ValueError("privacy mode refuses a cloud-only plan (split 0): raw token ids "
                             "would leave this device; plan a split >= 1")
        if stages.split >= cfg.num_layers:
            raise ValueError(f"split {stages.split} is end-only: there is nothing to serve")
        self.stages = stages
        self.spec = None if stages.split == 0 else stages.transport
        self.plan = pb.Plan(split=stages.split, codec=stages.transport.name)
        self.codec_fp = protocol.codec_fingerprint(codec)
        if stages.split > 0:
            from ec2moe_jax.pipeline.engine import EndEngine

            self.end = EndEngine(stages)

    def switch(self, stages, codec: dict | None) -> None:
        """Changes the plan (end stages and codec weights of another split or codec): the
        current session is closed (its slot freed); the next generation step opens a new one
        and replays the history under the new plan.

        Raises:
          ValueError: as the constructor (privacy, an end-only split).
        """
        self._use(stages, codec)
        self.close()

    # ----- connection ---------------------------------------------------------------------

    def _connect(self) -> None:
        opts = protocol.channel_options(self.limit)
        if self.tls_root is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.tls_root)
            self._channel = grpc.secure_channel(self.address, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(self.address, options=opts)
        self._stub = pb_grpc.CloudStub(self._channel)

    def _drop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None
        self.session = None

    def _end_session(self) -> None:
        """Frees the session's slot on the server (best effort)."""
        if self.session is not None and self._stub is not None:
            try:
                self._stub.Close(pb.CloseRequest(session=self.session), timeout=2.0,
                                 metadata=self.metadata)
            except grpc.RpcError:
                pass  # the server frees it after its TTL anyway
        self.session = None

    def close(self) -> None:
        """Frees the session's slot on the server (best effort) and closes the channel."""
        self._end_session()
        self._drop()

    def __enter__(self) -> EndClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, name: str, request, **kw):
        if self._stub is None:
            self._connect()
        self.stats.bytes_up += request.ByteSize()
        reply = getattr(self._stub, name)(request, timeout=self.timeout_s,
                                          metadata=self.metadata, wait_for_ready=True, **kw)
        self.stats.bytes_down += reply.ByteSize()
        return reply

    def server_stats(self) -> pb.StatsReply:
        """The server's live figures (queue length, step time, occupancy)."""
        return self._call("Stats", pb.StatsRequest())

    def _open_request(self) -> pb.OpenRequest:
        return pb.OpenRequest(plan=self.plan, fingerprint=self.fingerprint,
                              codec_fingerprint=self.codec_fp, temperature=self.temperature)

    def _recover(self, error: grpc.RpcError, outage_start: float, attempt: int) -> None:
        """Drops the connection and sleeps before the next attempt, or raises."""
        code = error.code()
        self.stats.events.append(f"{code.name}: {error.details()}")
        if code not in protocol.RETRYABLE:
            raise ServingError(f"{self.address}: {code.name}: {error.details()}", code) from None
        waited = time.monotonic() - outage_start
        if waited > self.retry.budget_s:
            raise ServingError(f"{self.address} unreachable for {waited:.1f} s (last: "
                               f"{code.name}: {error.details()}); giving up", code) from None
        self._drop()
        time.sleep(min(self.retry.max_s, self.retry.first_s * 2**attempt))

    # ----- generation ---------------------------------------------------------------------

    def warm_up(self, prompt_len: int) -> None:
        """Compiles the end side's prefill (at ``prompt_len`` positions) and decode step
        locally, without a server, so measured times exclude compilation."""
        if self.spec is None:
            return
        h = _History([0] * prompt_len)
        self._cover(h)
        h.tokens.append(0)
        self._cover(h)

    def _key(self):
        self.rng, sub = jax.random.split(self.rng)
        return sub

    def _cover(self, h: _History) -> None:
        """Runs the end layers over positions not yet encoded (all of the prompt at first,
        then the last token), appending their payloads."""
        if self.spec is None or h.covered == len(h.tokens):
            return
        if h.covered == 0:
            h.end_cache = self.end.init_cache(1)
            ids = np.asarray([h.tokens], np.int32)
            h.end_cache, msg, self.stats.end_prefill_s = self.end.prefill(h.end_cache, ids,
                                                                          self._key())
        else:
            tok = np.asarray([h.tokens[h.covered]], np.int32)
            h.end_cache, msg, dt = self.end.step(h.end_cache, tok, self._key())
            self.stats.end_s = dt if not self.stats.end_s else 0.7 * self.stats.end_s + 0.3 * dt
        h.chunks.append(jax.tree.map(np.asarray, msg.payload))
        h.covered = len(h.tokens)

    def _encode(self, h: _History, start: int = 0) -> bytes:
        if self.spec is None:
            return protocol.encode_state(np.asarray([h.tokens], np.int32), None)
        return protocol.encode_state(h.payload(start), self.spec)

    def _prefill(self, h: _History) -> int:
        """Prefills (or replays) the history; without a session, opens one in the same round
        trip."""
        payload = self._encode(h)
        request = (pb.PrefillRequest(session=self.session, payload=payload)
                   if self.session else pb.PrefillRequest(open=self._open_request(),
                                                          payload=payload))
        t0 = time.monotonic()
        reply = self._call("Prefill", request)
        self.session = reply.session or self.session
        self.stats.observe(time.monotonic() - t0, reply, up_bytes=len(payload))
        return reply.token

    def _stream(self, h: _History, n: int, emit: Callable[[int], None]) -> None:
        """Decodes up to ``n`` tokens on one stream, emitting each as it arrives."""
        requests: queue.Queue = queue.Queue()

        def feed():
            while (item := requests.get()) is not None:
                yield item

        deadline = self.timeout_s * (n + 1)
        call = self._stub.Decode(feed(), timeout=deadline, metadata=self.metadata)
        try:
            self._decode(h, n, emit, requests, call)
        except BaseException:
            call.cancel()  # the server frees the session of a cancelled stream
            raise
        finally:
            requests.put(pb.Step(detach=True))  # keep the session after this stream
            requests.put(None)
        for _ in call:  # a clean end: the server ends the stream
            pass

    def _decode(self, h: _History, n: int, emit, requests: queue.Queue, call) -> None:
        """The steps of one stream: cloud-only asks for ``n`` tokens at once; a split sends
        each position's payload and waits for its token."""
        if self.spec is None:
            requests.put(pb.Step(session=self.session, tokens=n))
            t0 = time.monotonic()
            for _ in range(n):  # the stream stays open for more steps: count replies
                reply = next(call)
                self.stats.bytes_down += reply.ByteSize()
                self.stats.observe(time.monotonic() - t0, reply)
                t0 = time.monotonic()
                emit(reply.token)
            return
        for i in range(n):
            busy = time.monotonic()
            self._cover(h)
            # The stream's first step names the session; the server keeps it for the rest.
            payload = self._encode(h, len(h.chunks) - 1)
            step = (pb.Step(session=self.session, payload=payload) if i == 0
                    else pb.Step(payload=payload))
            self.stats.bytes_up += step.ByteSize()
            t0 = time.monotonic()
            requests.put(step)
            reply = next(call)
            t1 = time.monotonic()
            self.stats.bytes_down += reply.ByteSize()
            self.stats.observe(t1 - t0, reply)
            emit(reply.token)
            mine = (t0 - busy) + (time.monotonic() - t1)
            c = self.stats.client_step_s
            self.stats.client_step_s = mine if not c else 0.7 * c + 0.3 * mine

    def generate(self, prompt: list[int], max_new_tokens: int,
                 on_token: Callable[[int], None] | None = None, *,
                 replan: Callable[[EndClient], bool] | None = None,
                 replan_every: int = 16) -> list[int]:
        """Generates ``max_new_tokens`` after ``prompt`` (token ids); ``on_token`` sees each
        new token as it arrives. Survives outages by reconnect and replay (module docstring).
        ``replan(client)`` runs every ``replan_every`` tokens; when it returns True it has
        called :meth:`switch`, and the history is replayed under the new plan.

        Raises:
          ValueError: an empty prompt, ids outside the vocabulary, or a request longer than
            the model's max_seq_len.
          ServingError: the server refused the plan or stayed unreachable past the retry
            budget.
        """
        v, limit = self.cfg.vocab_size, self.cfg.max_seq_len
        if not prompt or min(prompt) < 0 or max(prompt) >= v:
            raise ValueError(f"the prompt must be 1+ token ids in [0, {v})")
        if max_new_tokens < 1 or len(prompt) + max_new_tokens > limit:
            raise ValueError(f"prompt length {len(prompt)} + max_new_tokens {max_new_tokens} "
                             f"must be <= max_seq_len={limit} (and max_new_tokens >= 1)")
        self._end_session()  # a new sequence: a new session (a new KV row)
        h, out = _History(prompt), []
        try:
            return self._generate(h, out, max_new_tokens, on_token, replan, replan_every)
        finally:
            self._end_session()  # done (or failed): the slot is not held idle

    def _generate(self, h: _History, out: list, max_new_tokens: int, on_token, replan,
                  replan_every: int) -> list[int]:
        replay, outage, attempt = True, None, 0

        def emit(t: int) -> None:
            h.tokens.append(t)
            out.append(t)
            if on_token is not None:
                on_token(t)

        while len(out) < max_new_tokens:
            try:
                if replay:
                    self._cover(h)
                    emit(self._prefill(h))
                    replay = False
                else:
                    left = max_new_tokens - len(out)
                    self._stream(h, left if replan is None else min(left, replan_every), emit)
                outage, attempt = None, 0
                if replan is not None and len(out) < max_new_tokens and replan(self):
                    h.chunks, h.covered, h.end_cache = [], 0, None  # the new split's payloads
                    replay = True
            except grpc.RpcError as e:
                outage = time.monotonic() if outage is None else outage
                self._recover(e, outage, attempt)
                attempt += 1
                replay = True
                self.stats.reconnects += attempt == 1
        return out

    def score(self, rows: np.ndarray) -> np.ndarray:
        """Log-probabilities <float32>[B, T] of ``rows[:, 1:]`` given ``rows[:, :-1]``
        (<int32>[B, T + 1], B <= the server's max_score_batch), one unary call (retried with
        backoff on a lost connection)."""
        from ec2moe_jax.codec import wire

        rows = np.asarray(rows, np.int32)
        x, y = rows[:, :-1], rows[:, 1:]
        if self.spec is None:
            payload = protocol.encode_state(x, None)
        else:
            msg, _ = self.end.score(rows)
            payload = protocol.encode_state(jax.tree.map(np.asarray, msg.payload), self.spec)
        request = pb.ScoreRequest(plan=self.plan, fingerprint=self.fingerprint,
                                  codec_fingerprint=self.codec_fp, payload=payload,
                                  targets=protocol.encode_state(y, None))
        outage, attempt = None, 0
        while True:
            try:
                reply = self._call("Score", request)
                return wire.unpack(reply.logprobs, 1, expected_batch=len(rows),
                                   expected_time=x.shape[1]).values[..., 0]
            except grpc.RpcError as e:
                outage = time.monotonic() if outage is None else outage
                self._recover(e, outage, attempt)
                attempt += 1



def connect(address: str, workdir: str, plan, *, temperature: float = 0.0,
            token: str | None = None, tls_root: bytes | None = None, timeout_s: float = 30.0,
            retry: Retry = Retry(), privacy: bool = False, seed: int = 0,
            run=None) -> EndClient:
    """An :class:`EndClient` for ``plan`` (a :class:`~ec2moe_jax.pipeline.plans.
    PipelinePlan`) of the model in ``workdir``: loads it (or takes ``run``, the tuple
    :func:`~ec2moe_jax.training.load_run` returns), builds the end side only on the end mesh
    (the config's ``mesh.end_devices``) with the plan's resident experts, group gate and codec
    (:func:`~ec2moe_jax.pipeline.runtime.prepare`), and fingerprints the parameters and codec.

    Raises:
      FileNotFoundError: no trained model in ``workdir``.
      ValueError: a plan the model cannot run, or privacy with a split-0 plan.
    """
    from ec2moe_jax.pipeline import runtime
    from ec2moe_jax.sharding import make_mesh
    from ec2moe_jax.training import load_run
    from ec2moe_jax.training.workdir import params_fingerprint

    setup, params, splits, freq = load_run(workdir) if run is None else run
    if plan.split == 0 and privacy:  # before any work: the plan is refused whatever it costs
        raise ValueError("privacy mode refuses a cloud-only plan (split 0): raw token ids "
                         "would leave this device; plan a split >= 1")
    n = setup.cfg.mesh.end_devices
    devices = jax.devices()
    if len(devices) < n:
        raise ValueError(f"the end mesh needs mesh.end_devices={n} devices, this process has "
                         f"{len(devices)} (on CPU set JAX_NUM_CPU_DEVICES={n})")
    end_mesh = make_mesh(devices[:n], n, 1)
    stages, _ = runtime.prepare(setup.model, params, plan, end_mesh, None, frequencies=freq,
                                workdir=workdir, train_tokens=splits.train,
                                temperature=temperature, side="end")
    codec, _ = runtime.link_codec(setup.model, params, plan, workdir=workdir,
                                  train_tokens=splits.train)
    return EndClient(address, stages, fingerprint=params_fingerprint(params), codec=codec,
                     temperature=temperature, token=token, tls_root=tls_root,
                     timeout_s=timeout_s, retry=retry, privacy=privacy, seed=seed)
