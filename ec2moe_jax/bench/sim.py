"""Discrete-event simulator of many end devices sharing one cloud (*ours*).

Shape legend: N end devices, G generated tokens per request.

Each end device receives Poisson requests, groups them into micro-batches of its plan's size
and sends each micro-batch through its plan's stages: the end stage (the device, a FIFO
server), the uplink (:class:`~ec2moe_jax.pipeline.link.Link`, FIFO, bandwidth trace, half
the RTT), the cloud stage (one FIFO server shared by every device), the downlink. A
single-pass request (``gen_tokens == 0``) is one job; a decoding request is a prefill job and
``G - 1`` step jobs, each a full end -> cloud -> end round trip for a split plan; a
cloud-only plan streams its tokens down while the cloud runs the next step, an end-only plan
never touches the link. Events are processed in time order, so every server is exactly
FIFO by arrival.

The simulator composes jobs; how long a job takes comes from a :class:`Timing`:
:class:`ModelTiming` looks up the calibrated cost model
(:func:`ec2moe_jax.scheduler.model.job_costs`, the scheduler's own accounting), and the
validation harness plugs in real stage calls on this machine's submeshes
(:mod:`ec2moe_jax.bench.sim_validation`). Plans may change while the simulation runs: a
:class:`Controller` is ticked every ``interval_s`` and new micro-batches use the plan current
at the time they are formed (re-planning); jobs already formed finish under their own plan.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.pipeline.link import BandwidthTrace, Link
from ec2moe_jax.scheduler.model import Instance, Plan, job_costs

CLOUD_ONLY, SPLIT, END_ONLY = "cloud-only", "split", "end-only"


@dataclasses.dataclass(frozen=True)
class DevicePlan:
    """The simulator's view of what one device runs: its split, micro-batch size and plan
    kind; ``version`` identifies the joint scheduler plan it came from, whose job costs
    (:class:`ModelTiming`) or stages (the validation's real timing) it looks up.

    Not a plan of its own: the joint :class:`~ec2moe_jax.scheduler.Plan` (arrays over the
    devices) holds the decisions, and :class:`~ec2moe_jax.pipeline.plans.PipelinePlan` is one
    device's plan realised for the pipeline (codec name, resident experts). This is only the
    hashable per-device key that composing jobs needs."""

    split: int
    batch: int
    kind: str
    version: int = 0


@dataclasses.dataclass(eq=False)
class Job:
    """One micro-batch of requests of one device, through all of its steps."""

    device: int
    plan: DevicePlan
    ids: list[int]
    arrivals: list[float]
    first: float | None = None  # when the first token (or the scores) reached the end
    up_bytes: float = 0.0
    down_bytes: float = 0.0


class Timing(Protocol):
    """Seconds and bytes of step ``step`` of a job (0 is prefill or scoring). Called in
    causal order for each job (end, uplink, cloud, downlink of step 0, then step 1, ...),
    so a timing may run the real computation."""

    def end(self, job: Job, step: int) -> float: ...

    def cloud(self, job: Job, step: int) -> float: ...

    def up_bytes(self, job: Job, step: int) -> float: ...

    def down_bytes(self, job: Job, step: int) -> float: ...

    # Optional: ``cloud_wait(job, step) -> float``, seconds the job's step takes beyond its
    # share ``cloud(job, step)`` of the cloud's time without occupying the cloud (a batched
    # step: the server's time is shared by the batch's jobs, each of which waits for the
    # whole step). Absent: 0.


class Controller(Protocol):
    """Current plan of each device; ``tick(t, sim)`` may change it (re-planning)."""

    interval_s: float | None

    def plan(self, device: int) -> DevicePlan: ...

    def tick(self, t: float, sim: Simulator) -> None: ...


@dataclasses.dataclass
class Completed:
    device: int
    arrival: float
    done: float
    ttft: float
    tpot: float | None
    bytes_up: float
    bytes_down: float
    version: int = 0  # the joint plan its micro-batch ran under


@dataclasses.dataclass
class Result:
    """Completed requests and counters of one simulation."""

    horizon_s: float
    gen_tokens: int
    requests: list[Completed]
    offered: int
    switches: list[tuple[float, int]]  # (time, devices whose plan changed)
    busy: dict[str, float]  # seconds of service per resource class

    def summary(self, warmup: float = 0.1, window: tuple[float, float] | None = None
                ) -> dict:
        """Latency statistics of requests arriving after ``warmup x horizon`` (steady
        state) and throughput = completions inside ``window`` (default: the same interval
        to the horizon) per second. Missing latencies (nothing completed) are None."""
        h = self.horizon_s
        a, b = window or (warmup * h, h)
        lat = np.array([r.done - r.arrival for r in self.requests if r.arrival >= warmup * h])
        ttft = np.array([r.ttft for r in self.requests if r.arrival >= warmup * h])
        tpot = np.array([r.tpot for r in self.requests
                         if r.arrival >= warmup * h and r.tpot is not None])
        done = sum(a <= r.done < b for r in self.requests)
        tokens = max(self.gen_tokens, 1)

        def q(x, p):
            return float(np.quantile(x, p)) if x.size else None

        n = max(len(self.requests), 1)
        return {"offered_requests": self.offered, "completed_requests": len(self.requests),
                "throughput_rps": done / (b - a), "throughput_tokens_per_s":
                done * tokens / (b - a),
                "latency_mean_s": float(lat.mean()) if lat.size else None,
                "latency_p50_s": q(lat, 0.5), "latency_p95_s": q(lat, 0.95),
                "ttft_mean_s": float(ttft.mean()) if ttft.size else None,
                "tpot_mean_s": float(tpot.mean()) if tpot.size else None,
                "uplink_bytes_per_request": sum(r.bytes_up for r in self.requests) / n,
                "downlink_bytes_per_request": sum(r.bytes_down for r in self.requests) / n,
                "plan_switches": len(self.switches)}


def poisson_arrivals(rates: Sequence[float], horizon_s: float, seed: int) -> list[np.ndarray]:
    """Sorted Poisson arrival times in ``[0, horizon_s)`` per device (requests/s each)."""
    rng = np.random.default_rng(seed)
    out = []
    for r in rates:
        if r < 0:
            raise ValueError(f"request rate {r} must be >= 0")
        n = rng.poisson(r * horizon_s)
        out.append(np.sort(rng.uniform(0.0, horizon_s, n)))
    return out


class Simulator:
    """One run: devices, links, the shared cloud, the event queue."""

    def __init__(self, timing: Timing, controller: Controller, up: Sequence[BandwidthTrace],
                 down: Sequence[BandwidthTrace], rtt: Sequence[float], gen_tokens: int,
                 *, stream_after_first: bool = False):
        """``stream_after_first``: a cloud-only decoding request streams its tokens after
        one more uplink that follows the first token's arrival (a client that asks for the
        stream once its prefill has answered, as the gRPC client does); default: the cloud
        goes on decoding at once."""
        n = len(up)
        if not (len(down) == len(rtt) == n):
            raise ValueError(f"need one uplink, downlink and RTT per device: {len(up)}, "
                             f"{len(down)}, {len(rtt)}")
        if gen_tokens < 0:
            raise ValueError(f"{gen_tokens=} must be >= 0")
        self.timing, self.ctrl, self.gen = timing, controller, gen_tokens
        self.stream_after_first = stream_after_first
        self.up = [Link(f"up{i}", t, r) for i, (t, r) in enumerate(zip(up, rtt, strict=True))]
        self.down = [Link(f"down{i}", t, r) for i, (t, r) in enumerate(zip(down, rtt,
                                                                          strict=True))]
        self.end_free = [0.0] * n
        self.cloud_free = 0.0
        self.buffers: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        self.events: list = []
        self.seq = itertools.count()
        self.done: list[Completed] = []
        self.switches: list[tuple[float, int]] = []
        self.busy = {"end": 0.0, "cloud": 0.0}
        self.now = 0.0
        self.closed = False
        self.rid = itertools.count()
        self.offered = 0

    @property
    def num_devices(self) -> int:
        return len(self.up)

    def _push(self, t: float, fn, *args) -> None:
        heapq.heappush(self.events, (t, next(self.seq), fn, args))

    # -- requests and micro-batches ---------------------------------------------------
    def _arrive(self, t: float, device: int, rid: int) -> None:
        buf = self.buffers[device]
        buf.append((rid, t))
        if len(buf) >= self.ctrl.plan(device).batch:
            self._form(t, device)

    def _form(self, t: float, device: int) -> None:
        buf, self.buffers[device] = self.buffers[device], []
        if not buf:
            return
        job = Job(device, self.ctrl.plan(device), [r for r, _ in buf], [a for _, a in buf])
        self._start_step(t, job)

    def _start_step(self, t: float, job: Job, step: int = 0) -> None:
        if job.plan.kind == CLOUD_ONLY:
            if step == 0:
                self._uplink(t, job, 0)
            else:
                self._cloud(t, job, step)
        else:
            self._end(t, job, step)

    # -- resources ----------------------------------------------------------------------
    def _end(self, t: float, job: Job, step: int) -> None:
        dt = self.timing.end(job, step)
        start = max(t, self.end_free[job.device])
        self.end_free[job.device] = start + dt
        self.busy["end"] += dt
        nxt = self._step_done if job.plan.kind == END_ONLY else self._uplink
        self._push(start + dt, nxt, job, step)

    def _uplink(self, t: float, job: Job, step: int) -> None:
        nbytes = self.timing.up_bytes(job, step)
        job.up_bytes += nbytes
        self._push(self.up[job.device].send(t, nbytes).arrival, self._cloud, job, step)

    def _cloud(self, t: float, job: Job, step: int) -> None:
        dt = self.timing.cloud(job, step)
        start = max(t, self.cloud_free)
        self.cloud_free = start + dt
        self.busy["cloud"] += dt
        wait = getattr(self.timing, "cloud_wait", None)
        self._push(start + dt + (wait(job, step) if wait else 0.0), self._downlink, job, step)
        if (job.plan.kind == CLOUD_ONLY and step + 1 < max(self.gen, 1)
                and not (step == 0 and self.stream_after_first)):
            # The cloud keeps its own token and queues the next step at once; this token
            # streams down meanwhile.
            self._push(start + dt, self._cloud, job, step + 1)

    def _downlink(self, t: float, job: Job, step: int) -> None:
        nbytes = self.timing.down_bytes(job, step)
        job.down_bytes += nbytes
        self._push(self.down[job.device].send(t, nbytes).arrival, self._step_done, job, step)

    def _step_done(self, t: float, job: Job, step: int) -> None:
        if step == 0:
            job.first = t
        if step < max(self.gen, 1) - 1:
            if job.plan.kind != CLOUD_ONLY:
                self._start_step(t, job, step + 1)
            elif step == 0 and self.stream_after_first:  # the client asks for the stream
                self._uplink(t, job, 1)
            return
        b = len(job.ids)
        tpot = (t - job.first) / (self.gen - 1) if self.gen > 1 else None
        for a in job.arrivals:
            self.done.append(Completed(job.device, a, t, job.first - a, tpot,
                                       job.up_bytes / b, job.down_bytes / b,
                                       job.plan.version))
            if self.closed and t < self.horizon:  # the client issues its next request
                self._push(t, self._arrive, job.device, next(self.rid))
                self.offered += 1

    def _tick(self, t: float) -> None:
        self.ctrl.tick(t, self)
        if self.ctrl.interval_s and t + self.ctrl.interval_s < self.horizon:
            self._push(t + self.ctrl.interval_s, self._tick)

    # -- driver -------------------------------------------------------------------------
    def run(self, arrivals: Sequence[np.ndarray], horizon_s: float,
            stop_s: float = float("inf")) -> Result:
        """Simulates requests arriving at ``arrivals`` (per device, seconds in
        ``[0, horizon_s)``); partial micro-batches are flushed at the horizon. Events after
        ``stop_s`` are dropped (overload runs: the backlog need not drain)."""
        if len(arrivals) != self.num_devices:
            raise ValueError(f"{len(arrivals)} arrival streams for {self.num_devices} devices")
        self.horizon = horizon_s
        for d, times in enumerate(arrivals):
            for a in np.asarray(times, np.float64):
                self._push(float(a), self._arrive, d, next(self.rid))
                self.offered += 1
            if not self.closed:
                self._push(horizon_s, self._form, d)
        if self.ctrl.interval_s:
            self._push(self.ctrl.interval_s, self._tick)
        # Ties in time keep insertion order (the sequence number), so runs are deterministic.
        while self.events:
            t, _, fn, args = heapq.heappop(self.events)
            if t > stop_s:
                break
            self.now = t
            fn(t, *args)
        return Result(horizon_s, self.gen, self.done, self.offered, self.switches, self.busy)

    def run_closed(self, concurrency: int, horizon_s: float) -> Result:
        """Closed-loop saturation run: every device keeps ``concurrency`` requests
        outstanding (a new one is issued when one completes) until ``horizon_s``, where the
        simulation stops. Offered load never outruns the system, so completions per second
        measure its capacity without the goodput collapse of an open queue in overload
        (where in-flight decode steps queue behind ever more new prefills)."""
        if concurrency < 1:
            raise ValueError(f"{concurrency=} must be >= 1")
        self.closed = True
        return self.run([np.zeros(concurrency)] * self.num_devices, horizon_s,
                        stop_s=horizon_s)


# -- cost-model timing --------------------------------------------------------------------
_job_costs = jax.jit(job_costs)


def device_plans(inst: Instance, plan: Plan, version: int = 0) -> list[DevicePlan]:
    """Per-device :class:`DevicePlan` of a joint scheduler plan [N]."""
    L = inst.num_layers
    splits = np.asarray(plan.split).tolist()
    batch = np.asarray(inst.batch)[np.asarray(plan.batch)].astype(int).tolist()
    return [DevicePlan(s, b, CLOUD_ONLY if s == 0 else END_ONLY if s == L else SPLIT, version)
            for s, b in zip(splits, batch, strict=True)]


@dataclasses.dataclass
class _Costs:
    end: np.ndarray  # [G', N] seconds, step 0 = prefill
    cloud: np.ndarray
    up: np.ndarray
    down: np.ndarray


class ModelTiming:
    """Job times and bytes from the calibrated cost model, per registered joint plan.

    Prefill (or scoring) jobs attend over ``T / 2`` positions on average (causal); decode
    step ``k`` over ``T + k``. The instance's link fields are not used: the simulator's
    links carry the bytes.
    """

    def __init__(self, inst: Instance):
        self.inst = inst
        self.T = int(inst.prompt_tokens)
        self.G = int(inst.gen_tokens)
        self.versions: list[_Costs] = []

    def register(self, plan: Plan) -> int:
        """Computes the costs of a joint plan [N]; returns its version number."""
        inst, T, G = self.inst, self.T, self.G
        pre = _job_costs(inst, plan, T, T / 2.0, None if G == 0 else 1)  # None: scoring
        rows = {k: [np.asarray(v, np.float64)] for k, v in pre.items()}
        if G > 1:
            ctx = jnp.asarray(T + np.arange(1, G), jnp.float32)[:, None]
            step = _job_costs(inst, plan, 1, ctx, 1)
            for k, v in step.items():
                rows[k].append(np.broadcast_to(np.asarray(v, np.float64),
                                               (G - 1, inst.num_devices)))
        cat = {k: np.concatenate([np.atleast_2d(x) for x in v]) for k, v in rows.items()}
        self.versions.append(_Costs(cat["end_s"], cat["cloud_s"], cat["up_bytes"],
                                    cat["down_bytes"]))
        return len(self.versions) - 1

    def end(self, job: Job, step: int) -> float:
        return float(self.versions[job.plan.version].end[step, job.device])

    def cloud(self, job: Job, step: int) -> float:
        return float(self.versions[job.plan.version].cloud[step, job.device])

    def up_bytes(self, job: Job, step: int) -> float:
        return float(self.versions[job.plan.version].up[step, job.device])

    def down_bytes(self, job: Job, step: int) -> float:
        return float(self.versions[job.plan.version].down[step, job.device])


class StaticController:
    """A fixed joint plan (baselines, the static ablation, validation)."""

    interval_s = None

    def __init__(self, plans: Sequence[DevicePlan]):
        self.plans = list(plans)

    def plan(self, device: int) -> DevicePlan:
        return self.plans[device]

    def tick(self, t: float, sim: Simulator) -> None:  # never re-plans
        return None
