"""A link-shaping TCP relay for tests and benchmarks: one-way delay, jitter, a bandwidth cap,
and drop-and-reset of every connection, in user space (no root, no netem).

Clients connect to the relay's port; for each connection it opens one to the upstream server
and pumps bytes both ways. Each direction is a FIFO link: a chunk read at time ``t`` leaves
the link when the link is free and its bytes have been serialised at the capped rate
(``8 * len / rate_bps`` seconds), then arrives ``delay_s`` (+ uniform jitter in
``[0, jitter_s]``) later, never before the chunk ahead of it (TCP keeps order). What the relay
emulates is the link's delay and rate; the sockets, the kernel's TCP on loopback, the bytes
and their timing on both ends are real. Byte counters per direction are measured at the
relay's sockets (payload bytes of TCP, i.e. HTTP/2 frames with gRPC's headers).

Run it inside an asyncio loop (:meth:`Relay.start`) or in a background thread
(:func:`start_in_thread`, for tests and benchmarks whose clients are other processes).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import socket
import struct
import threading
import time

CHUNK = 64 * 1024  # bytes read per socket read; large chunks keep the relay's overhead low
BUFFER = 256 * 1024  # bytes a direction holds before it stops reading (backpressure, as TCP)


@dataclasses.dataclass(frozen=True)
class Shape:
    """The emulated link, the same both ways.

    Attributes:
      delay_s: one-way propagation delay in seconds (RTT = 2 * delay_s).
      jitter_s: extra delay per chunk, uniform in [0, jitter_s] (order kept).
      rate_bps: bandwidth cap in bits/s per direction (None: uncapped).
      seed: seed of the jitter.

    Raises:
      ValueError: a negative delay or jitter, or a non-positive rate.
    """

    delay_s: float = 0.0
    jitter_s: float = 0.0
    rate_bps: float | None = None
    seed: int = 0

    def __post_init__(self):
        if not (self.delay_s >= 0 and self.jitter_s >= 0):
            raise ValueError(f"Shape delay_s={self.delay_s}, jitter_s={self.jitter_s} must be "
                             ">= 0")
        if self.rate_bps is not None and not self.rate_bps > 0:
            raise ValueError(f"Shape rate_bps={self.rate_bps} must be > 0 (or None: uncapped)")


class _Direction:
    """One direction of one connection: a FIFO link feeding a writer."""

    def __init__(self, relay: Relay, writer: asyncio.StreamWriter, counter: str):
        self.relay, self.writer, self.counter = relay, writer, counter
        self.queue: collections.deque = collections.deque()
        self.ready = asyncio.Event()
        self.link_free = 0.0  # when the link finishes serialising what it holds
        self.last_arrival = 0.0
        self.held = 0  # bytes queued, not yet delivered
        self.space = asyncio.Event()

    def push(self, data: bytes) -> None:
        shape, now = self.relay.shape, time.monotonic()
        start = max(now, self.link_free)
        if shape.rate_bps:
            self.link_free = start + 8 * len(data) / shape.rate_bps
        else:
            self.link_free = start
        jitter = self.relay.rng.uniform(0, shape.jitter_s) if shape.jitter_s else 0.0
        arrival = max(self.link_free + shape.delay_s + jitter, self.last_arrival)
        self.last_arrival = arrival
        self.queue.append((arrival, data))
        self.held += len(data)
        self.ready.set()

    async def wait_for_space(self) -> None:
        while self.held > BUFFER:
            self.space.clear()
            await self.space.wait()

    async def deliver(self) -> None:
        while True:
            while not self.queue:
                self.ready.clear()
                await self.ready.wait()
            arrival, data = self.queue.popleft()
            if data is None:  # the reader reached EOF: half-close after what was queued
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            wait = arrival - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            # How far behind its emulated arrival the chunk leaves (the relay's own delay:
            # a busy event loop or CPU makes the link slower than its shape).
            self.relay.lateness["chunks"] += 1
            self.relay.lateness["late_s"] += max(time.monotonic() - arrival, 0.0)
            self.writer.write(data)
            self.relay.bytes[self.counter] += len(data)
            self.held -= len(data)
            self.space.set()
            await self.writer.drain()

    def close(self) -> None:
        self.queue.append((0.0, None))
        self.ready.set()


class Relay:
    """The relay between ``listen`` (host, port; port 0 picks a free one) and ``upstream``.

    Attributes:
      shape: the emulated link (may be replaced while running: new chunks use the new one).
      bytes: {"up": client->server bytes, "down": server->client bytes} delivered so far.
      lateness: {"chunks": chunks delivered, "late_s": their summed delay past the emulated
        arrival time} (measured: what the relay itself added to the shaped link).
      connections: connections accepted so far.
    """

    def __init__(self, upstream: tuple[str, int], shape: Shape = Shape(),
                 listen: tuple[str, int] = ("127.0.0.1", 0)):
        self.upstream, self.shape, self.listen = upstream, shape, listen
        self.rng = random.Random(shape.seed)
        self.bytes = {"up": 0, "down": 0}
        self.lateness = {"chunks": 0, "late_s": 0.0}
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._live: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the relay is not started")
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._accept, *self.listen)
        return self

    async def _accept(self, c_reader, c_writer) -> None:
        self.connections += 1
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(c_writer)
            return
        pair = (c_writer, s_writer)
        self._live.add(pair)
        up, down = _Direction(self, s_writer, "up"), _Direction(self, c_writer, "down")
        tasks = [asyncio.ensure_future(x) for x in
                 (_pump(c_reader, up), _pump(s_reader, down), up.deliver(), down.deliver())]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            for t in tasks:
                t.cancel()
                self._tasks.discard(t)
            self._live.discard(pair)
            for w in pair:
                _abort(w)

    async def reset(self) -> int:
        """Drops every live connection with a TCP reset (what a lost link or a NAT timeout
        does to the peers); the relay keeps listening. Returns how many were dropped."""
        live = list(self._live)
        for pair in live:
            for w in pair:
                _abort(w)
        for t in list(self._tasks):
            t.cancel()
        return len(live)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self.reset()
            await self._server.wait_closed()


async def _pump(reader: asyncio.StreamReader, direction: _Direction) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            direction.close()
            return
        direction.push(data)
        await direction.wait_for_space()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Closes with RST, not FIN: the peer sees a reset connection, as on a dropped link."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class RelayThread:
    """A :class:`Relay` running in its own thread and event loop (for tests and benchmarks
    whose client and server are other processes). Use as a context manager, or call
    :meth:`close`."""

    def __init__(self, upstream: tuple[str, int], shape: Shape = Shape(),
                 listen: tuple[str, int] = ("127.0.0.1", 0)):
        self.loop = asyncio.new_event_loop()
        self.relay = Relay(upstream, shape, listen)
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.relay.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="relay", daemon=True)
        self.thread.start()
        if not started.wait(10):
            raise RuntimeError("the relay did not start within 10 s")

    @property
    def port(self) -> int:
        return self.relay.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set_shape(self, shape: Shape) -> None:
        self.loop.call_soon_threadsafe(setattr, self.relay, "shape", shape)

    def bytes(self) -> dict[str, int]:
        return asyncio.run_coroutine_threadsafe(_copy(self.relay.bytes), self.loop).result(5)

    def lateness(self) -> dict[str, float]:
        """A copy of :attr:`Relay.lateness`."""
        return asyncio.run_coroutine_threadsafe(_copy(self.relay.lateness), self.loop).result(5)

    def reset(self) -> int:
        """Drops every live connection (see :meth:`Relay.reset`); returns how many."""
        return asyncio.run_coroutine_threadsafe(self.relay.reset(), self.loop).result(5)

    def close(self) -> None:
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(self.relay.close(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def __enter__(self) -> RelayThread:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


async def _copy(d: dict) -> dict:
    return dict(d)
