"""Link emulation on a virtual clock: bandwidth traces, RTT, FIFO serialisation, failures,
bounded retries and exactly-once delivery of requests.

A message of ``n`` bytes sent at time ``t`` waits for the link to be free (FIFO), occupies
it for its serialisation time (``8 n / bandwidth``, integrated over a piecewise-constant
bandwidth trace) and arrives half a round trip later. Times are seconds on the executor's
virtual clock, so the accounting is exact and deterministic (tests compute it by hand); the
executor can pace wall time to it (real-time mode) when a demo should feel real.

Failures: a message is lost if its index on that link (every attempt counts) is in
``Failures.drop`` or it starts inside a ``Failures.down`` interval. The sender notices a loss
``2 RTT`` after the lost message left its sender (the expected reply time plus one RTT of
slack; at least 2 ms) and resends, at most ``max_attempts`` times in all, then raises
:class:`LinkError`. The receiver remembers what it served per message key while that
exchange lasts, so a resent request whose *reply* was lost is answered again without
recomputing (a decode step's KV cache never advances twice): nothing is lost silently and
nothing runs twice. The memory ends with the exchange, so a later call that uses the same
keys on the same channel (a second ``generate``) is served afresh, never answered with the
first call's replies.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Hashable, Sequence

from ec2moe_jax.profiles import LinkProfile


class LinkError(RuntimeError):
    """A message could not be delivered within the retry budget."""


@dataclasses.dataclass(frozen=True)
class Drop:
    """A step drop of bandwidth: ``factor`` times the bandwidth over ``[start_s, start_s +
    duration_s)`` (a handover, a tunnel, a congested cell)."""

    start_s: float
    duration_s: float
    factor: float  # bandwidth multiplier during the drop, in (0, 1]

    def __post_init__(self):
        if self.start_s < 0 or self.duration_s <= 0 or not 0 < self.factor <= 1:
            raise ValueError(f"Drop(start_s={self.start_s}, duration_s={self.duration_s}, "
                             f"factor={self.factor}) needs start >= 0, duration > 0 and a "
                             "factor in (0, 1]")


@dataclasses.dataclass(frozen=True)
class BandwidthTrace:
    """Piecewise-constant bandwidth: ``bps[i]`` bits/s from ``times[i]`` (s) until the next
    change; ``times[0]`` must be 0 and the last value holds forever."""

    times: tuple[float, ...]
    bps: tuple[float, ...]

    def __post_init__(self):
        if not self.times or self.times[0] != 0 or len(self.times) != len(self.bps):
            raise ValueError(f"trace needs matching times/bps starting at 0, got "
                             f"times={self.times} bps={self.bps}")
        if any(b <= a for a, b in zip(self.times, self.times[1:], strict=False)):
            raise ValueError(f"trace times {self.times} must increase strictly")
        if any(not b > 0 for b in self.bps):
            raise ValueError(f"trace bandwidths {self.bps} must be > 0 (model an outage "
                             "with Failures.down instead)")

    @classmethod
    def constant(cls, bps: float, drops: Sequence[Drop] = ()) -> BandwidthTrace:
        """``bps`` bits/s throughout, except during ``drops`` (exact breakpoints). Drops are
        meant not to overlap: each one's end restores ``bps``."""
        points = {0.0: float(bps)}
        for d in sorted(drops, key=lambda d: d.start_s):
            points[d.start_s] = float(bps) * d.factor
            points.setdefault(d.start_s + d.duration_s, float(bps))
        times = sorted(points)
        return cls(tuple(times), tuple(points[t] for t in times))

    def mean_bps(self, start: float, stop: float) -> float:
        """Time-averaged bandwidth over ``[start, stop)`` (what a device measures over a
        window); the value at ``start`` when the window is empty."""
        i = max(bisect.bisect_right(self.times, start) - 1, 0)
        if stop <= start:
            return self.bps[i]
        bits, t = 0.0, start
        while t < stop:
            end = min(self.times[i + 1] if i + 1 < len(self.times) else stop, stop)
            bits += (end - t) * self.bps[i]
            t, i = end, i + 1
        return bits / (stop - start)

    def finish(self, start: float, nbytes: float) -> float:
        """When a message of ``nbytes`` whose serialisation starts at ``start`` has left."""
        bits = 8.0 * nbytes
        i = max(bisect.bisect_right(self.times, start) - 1, 0)
        t = start
        while True:
            end = self.times[i + 1] if i + 1 < len(self.times) else float("inf")
            capacity = (end - t) * self.bps[i]
            if bits <= capacity:
                return t + bits / self.bps[i]
            bits -= capacity
            t, i = end, i + 1


@dataclasses.dataclass(frozen=True)
class Failures:
    """Injected losses: message indices on a link (0-based, every attempt counts) and
    ``(start, stop)`` outage intervals in seconds."""

    drop: frozenset[int] = frozenset()
    down: tuple[tuple[float, float], ...] = ()

    def lost(self, index: int, start: float) -> bool:
        return index in self.drop or any(a <= start < b for a, b in self.down)


@dataclasses.dataclass(frozen=True)
class Delivery:
    start: float  # serialisation began
    arrival: float  # fully received (if delivered)
    delivered: bool


class Link:
    """One direction of the link (FIFO) on the virtual clock."""

    def __init__(self, name: str, trace: BandwidthTrace, rtt_s: float,
                 failures: Failures = Failures()):
        if rtt_s < 0:
            raise ValueError(f"link {name!r}: rtt_s={rtt_s} must be >= 0")
        self.name, self.trace, self.rtt_s, self.failures = name, trace, rtt_s, failures
        self.free_at = 0.0
        self.sent = 0  # messages put on the link (attempts)
        self.bytes = 0  # bytes put on the link (attempts)

    @classmethod
    def from_profile(cls, profile: LinkProfile, failures: Failures = Failures(),
                     name: str | None = None) -> Link:
        return cls(name or profile.name, BandwidthTrace.constant(profile.bandwidth_bps),
                   profile.rtt_s, failures)

    def send(self, ready: float, nbytes: int) -> Delivery:
        start = max(ready, self.free_at)
        self.free_at = self.trace.finish(start, nbytes)
        lost = self.failures.lost(self.sent, start)
        self.sent += 1
        self.bytes += nbytes
        return Delivery(start, self.free_at + self.rtt_s / 2, not lost)


@dataclasses.dataclass
class Exchange:
    """Outcome of one request/reply: reply arrival time, attempts, bytes each way."""

    arrival: float
    attempts: int
    bytes_up: int
    bytes_down: int


class Channel:
    """Uplink + downlink with bounded retries and exactly-once service per exchange.

    ``served_count[key]``: how often a request under ``key`` was computed over the channel's
    life (once per exchange; a later call reusing the key adds one). ``up.bytes`` and
    ``down.bytes`` likewise count the channel's whole life.
    """

    def __init__(self, up: Link, down: Link, max_attempts: int = 3):
        if max_attempts < 1:
            raise ValueError(f"{max_attempts=} must be >= 1")
        self.up, self.down, self.max_attempts = up, down, max_attempts
        self.served_count: dict[Hashable, int] = {}

    @classmethod
    def from_profile(cls, profile: LinkProfile, *, up_failures: Failures = Failures(),
                     down_failures: Failures = Failures(), max_attempts: int = 3) -> Channel:
        return cls(Link.from_profile(profile, up_failures, f"{profile.name}-up"),
                   Link.from_profile(profile, down_failures, f"{profile.name}-down"),
                   max_attempts)

    def _timeout(self) -> float:
        return 2.0 * max(self.up.rtt_s, 1e-3)

    def _retry_at(self, lost: Delivery) -> float:
        return lost.arrival - self.up.rtt_s / 2 + self._timeout()

    def round_trip(self, key: Hashable, ready: float, up_bytes: int,
                   serve: Callable[[float], float], down_bytes: int) -> Exchange:
        """Sends a request at ``ready``; ``serve(arrival) -> reply ready time`` runs at the
        receiver exactly once in this exchange, however many attempts it takes; returns when
        the reply reached the sender.

        Raises:
          LinkError: no reply after ``max_attempts`` attempts.
        """
        sent_up = sent_down = 0
        served: float | None = None  # the receiver's memory of this exchange's reply
        for attempt in range(1, self.max_attempts + 1):
            up = self.up.send(ready, up_bytes)
            sent_up += up_bytes
            if up.delivered:
                if served is None:
                    served = serve(up.arrival)
                    self.served_count[key] = self.served_count.get(key, 0) + 1
                reply_ready = max(served, up.arrival)
                down = self.down.send(reply_ready, down_bytes)
                sent_down += down_bytes
                if down.delivered:
                    return Exchange(down.arrival, attempt, sent_up, sent_down)
                ready = self._retry_at(down)
            else:
                ready = self._retry_at(up)
        raise LinkError(
            f"request {key!r}: no reply after {self.max_attempts} attempts over "
            f"{self.up.name}/{self.down.name} (gave up at t={ready:.3f} s); "
            "the request was not completed and is reported as failed")

    def push(self, key: Hashable, ready: float, nbytes: int) -> Exchange:
        """A reply-less downlink message (a streamed token), resent until delivered."""
        sent = 0
        for attempt in range(1, self.max_attempts + 1):
            d = self.down.send(ready, nbytes)
            sent += nbytes
            if d.delivered:
                return Exchange(d.arrival, attempt, 0, sent)
            ready = self._retry_at(d)
        raise LinkError(f"message {key!r}: not delivered after {self.max_attempts} attempts "
                        f"over {self.down.name}")


def channel_for(profile: LinkProfile | None, traces: Sequence[BandwidthTrace] | None = None,
                **kw) -> Channel:
    """A channel from a profile, optionally replacing its bandwidth by ``traces``
    (one for both directions, or (up, down))."""
    if profile is None:
        raise ValueError("a link profile is required (e.g. ec2moe_jax.profiles.link('lte'))")
    ch = Channel.from_profile(profile, **kw)
    if traces:
        ch.up.trace = traces[0]
        ch.down.trace = traces[-1]
    return ch
