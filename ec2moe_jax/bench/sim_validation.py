"""Validation of the many-device simulator (:mod:`ec2moe_jax.bench.sim`) against the real
pipeline on this machine (*ours*).

Shape legend: N end devices, B micro-batch, T scored tokens, P prompt tokens, G generated
tokens, L layers, E experts.

The same :class:`~ec2moe_jax.bench.sim.Simulator` runs twice on identical Poisson arrivals
and the same joint plan: once with :class:`RealTiming`, which runs every job's real stages
through the stage engine (:mod:`ec2moe_jax.pipeline.engine`) on this machine's end and cloud
submeshes and charges their measured wall time, and once with
:class:`~ec2moe_jax.bench.sim.ModelTiming`, the scheduler's cost model calibrated on this
CPU. The link is emulated identically on both sides, so the comparison isolates the cost
model's job times (and what queueing does with them). A second check runs the simulator with
:class:`RealTiming` against :func:`~ec2moe_jax.pipeline.executor.score` /
:func:`~ec2moe_jax.pipeline.executor.generate` for one device with every request at
``t = 0``: both compose measured stage times with the same link model.

Every figure is labelled: :data:`REAL_LABEL` or :data:`SIM_LABEL`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ec2moe_jax.bench.sim import (
    CLOUD_ONLY,
    END_ONLY,
    DevicePlan,
    Job,
    ModelTiming,
    Result,
    Simulator,
    StaticController,
    device_plans,
    poisson_arrivals,
)
from ec2moe_jax.files import write_text_atomic
from ec2moe_jax.models.generate import request_cache_length
from ec2moe_jax.pipeline import executor
from ec2moe_jax.pipeline.engine import CloudEngine, EndEngine, Message, Scores, Timer, measured
from ec2moe_jax.pipeline.link import BandwidthTrace, Channel
from ec2moe_jax.pipeline.stages import Stages
from ec2moe_jax.profiles import LinkProfile
from ec2moe_jax.scheduler.model import Instance, Plan

REAL_LABEL = ("measured stage compute on this CPU (fake devices: end 2, cloud 6), "
              "link emulated")
SIM_LABEL = "simulated (cost model calibrated on this CPU)"
LINK = LinkProfile("validation", bandwidth_bps=20e6, rtt_s=0.02)
# The validated plans: (split, resident fraction of the end layers' experts, codec, batch);
# a split of -1 means "every layer" (end-only).
PLANS = {"split": (2, 0.5, "int8-r64", 1), "cloud-only": (0, 0.0, "bf16", 1),
         "end-only": (-1, 1.0, "bf16", 1)}
TRAIN_COMMAND = "ec2moe train --config small --workdir runs/small"


@dataclasses.dataclass
class _JobState:
    rows: np.ndarray  # [B, T + 1] scoring windows or [B, P] prompts
    msg: Message | None = None  # the end's message on its way to the cloud
    end_cache: Any = None
    cloud_cache: Any = None
    token: Any = None  # last sampled token, <int32>[B]
    out: list = dataclasses.field(default_factory=list)


class RealTiming:
    """A :class:`~ec2moe_jax.bench.sim.Timing` that runs each job's real stages.

    Every call runs the job's end or cloud engine (:mod:`ec2moe_jax.pipeline.engine`),
    exactly as the executor does (the ``hop`` charged to the cloud, caches donated step to
    step), and returns the seconds ``timer`` charges (default: wall time with
    ``jax.block_until_ready``); bytes are the engine's message sizes. Request ``r`` reads row
    ``r % len(texts)`` of ``texts``. Compile first with :meth:`warm_up` for every micro-batch
    size a run can form, or compilation lands in the measured times.

    Args:
      stages: one :class:`Stages` for every job, or one per :class:`DevicePlan`.
      texts: scoring windows [R, T + 1] (``gen_tokens == 0``) or prompts [R, P].
      gen_tokens: G of the simulator (0: single-pass scoring).
      timer: ``timer(name, fn, *args) -> (out, seconds)`` like the executor's
        (:func:`~ec2moe_jax.pipeline.engine.fixed_times` for deterministic tests).

    Attributes:
      seconds: charged seconds per stage function (end, cloud, hop, end_prefill, ...).
      charged: seconds returned to the simulator per side and job kind (end_score,
        cloud_score, end_prefill, end_step, cloud_prefill, cloud_step; the hop included).
      outputs: per request id, its log-probabilities [T] or generated tokens [G].
    """

    def __init__(self, stages: Stages | Mapping[DevicePlan, Stages], texts: np.ndarray, *,
                 gen_tokens: int, timer: Timer = measured, seed: int = 0):
        self.stages = stages
        self.texts = np.asarray(texts, np.int32)
        if self.texts.ndim != 2 or len(self.texts) == 0:
            raise ValueError(f"texts must be a non-empty [R, T] array, got {self.texts.shape}")
        if gen_tokens == 0 and self.texts.shape[1] < 2:
            raise ValueError("scoring windows need at least 2 tokens (input and target)")
        self.gen, self.timer = gen_tokens, timer
        self.keys = list(jax.random.split(jax.random.key(seed), max(gen_tokens, 1)))
        self.seconds: dict[str, list[float]] = {}
        self.charged: dict[str, list[float]] = {}
        self.outputs: dict[int, np.ndarray] = {}
        self._jobs: dict[Job, _JobState] = {}
        every = [stages] if isinstance(stages, Stages) else stages.values()
        self._engines = {id(s): (EndEngine(s, self._run), CloudEngine(s, self._run))
                         for s in every}

    # -- bookkeeping ----------------------------------------------------------------------
    def _pair(self, job: Job) -> tuple[EndEngine, CloudEngine]:
        s = self.stages if isinstance(self.stages, Stages) else self.stages[job.plan]
        return self._engines[id(s)]

    def _state(self, job: Job) -> _JobState:
        st = self._jobs.get(job)
        if st is None:
            rows = self.texts[np.asarray(job.ids) % len(self.texts)]
            st = self._jobs[job] = _JobState(rows)
            if self.gen:  # sized as the executor sizes them, so warm_up compiled these
                m = self._cache_length(self._pair(job)[0].stages)
                st.end_cache, st.cloud_cache = (e.init_cache(len(rows), m)
                                                for e in self._pair(job))
        return st

    def _cache_length(self, stages: Stages) -> int:
        """The KV cache length of a request (its prompt plus the generated tokens, in the
        bucket :func:`~ec2moe_jax.pipeline.executor.generate` uses): a cache of
        ``max_seq_len`` has other shapes than the warmed-up ones and compiled inside the
        first measured run (seconds of stalls in its real latencies)."""
        return request_cache_length(stages.model.cfg, self.texts.shape[1], self.gen)

    def _message(self, job: Job, st: _JobState) -> Message:
        if st.msg is None:  # split 0: the end sends the raw ids, computing nothing
            end = self._pair(job)[0]
            st.msg = (end.score(st.rows)[0] if self.gen == 0
                      else end.prefill(st.end_cache, st.rows, self.keys[0])[1])
        return st.msg

    def _run(self, name: str, fn, *args):
        out, dt = self.timer(name, fn, *args)
        self.seconds.setdefault(name, []).append(dt)
        return out, dt

    def _keep(self, st: _JobState, res) -> None:
        if isinstance(res, Scores):
            st.out.append(np.asarray(res.logprobs))
        else:
            st.token = res.token
            st.out.append(res.token)

    def _finish(self, job: Job, st: _JobState) -> None:
        out = np.concatenate(st.out) if self.gen == 0 else np.stack(st.out, 1)
        for rid, row in zip(job.ids, out, strict=True):
            self.outputs[rid] = row
        del self._jobs[job]

    def _charge(self, side: str, step: int, dt: float) -> float:
        kind = "score" if self.gen == 0 else "prefill" if step == 0 else "step"
        self.charged.setdefault(f"{side}_{kind}", []).append(dt)
        return dt

    # -- the Timing protocol --------------------------------------------------------------
    def end(self, job: Job, step: int) -> float:
        end, st = self._pair(job)[0], self._state(job)
        if self.gen == 0:
            out, dt = end.score(st.rows)
        elif step == 0:
            st.end_cache, out, dt = end.prefill(st.end_cache, st.rows, self.keys[0])
        else:
            st.end_cache, out, dt = end.step(st.end_cache, st.token, self.keys[step])
        if isinstance(out, Message):
            st.msg = out
        else:  # end-only: the end's result is final
            self._keep(st, out)
            if step == max(self.gen, 1) - 1:
                self._finish(job, st)
        return self._charge("end", step, dt)

    def cloud(self, job: Job, step: int) -> float:
        cloud, st = self._pair(job)[1], self._state(job)
        if self.gen == 0:
            res, dt = cloud.score(self._message(job, st))
        elif step > 0 and cloud.stages.cloud_only:  # its own token: no hop
            st.cloud_cache, res, dt = cloud.generate(st.cloud_cache, st.token, self.keys[step])
        else:
            fn = cloud.prefill if step == 0 else cloud.step
            st.cloud_cache, res, dt = fn(st.cloud_cache, self._message(job, st),
                                         self.keys[step])
        self._keep(st, res)
        return self._charge("cloud", step, dt)

    def up_bytes(self, job: Job, step: int) -> float:
        return float(self._message(job, self._state(job)).nbytes)

    def down_bytes(self, job: Job, step: int) -> float:
        b = len(job.ids)
        nbytes = CloudEngine.reply_bytes(b, self.texts.shape[1] - 1 if self.gen == 0 else 1)
        if step == max(self.gen, 1) - 1:  # the last call of a job that used the cloud
            self._finish(job, self._state(job))
        return float(nbytes)

    def warm_up(self, batch_sizes: Sequence[int], repeats: int = 2) -> None:
        """Compiles (and runs ``repeats`` times, untimed) every stage at micro-batches of
        ``batch_sizes`` requests, so measured times exclude compilation and first-call
        costs."""
        from ec2moe_jax.pipeline import runtime

        for s in (end.stages for end, _ in self._engines.values()):
            for b in batch_sizes:
                rows = self.texts[np.arange(b) % len(self.texts)]
                for _ in range(repeats):  # generation at the request's length: its bucket
                    runtime.warm_up(s, texts=None if self.gen else rows,
                                    prompts=rows if self.gen else None, micro_batch=b,
                                    link=LINK, new_tokens=max(self.gen, 1))


# -- plans, loads, runs -------------------------------------------------------------------
def scheduler_plan(kind: str, inst: Instance, codec_names: Sequence[str]) -> Plan:
    """The joint plan [N] of one validation plan kind (:data:`PLANS`), the same for every
    device: resident experts are the top-n per end layer, 0 after the split."""
    split, frac, codec, batch = PLANS[kind]
    L, E, n = inst.num_layers, inst.num_experts, inst.num_devices
    split = L if split < 0 else split
    resident = [round(frac * E) if i < split else 0 for i in range(L)]
    batches = np.asarray(inst.batch).astype(int).tolist()
    if codec not in codec_names or batch not in batches:
        raise ValueError(f"plan {kind!r}: codec {codec!r} or micro-batch {batch} is not an "
                         f"option of the instance ({list(codec_names)}, {batches})")
    full = lambda v, dt=np.int32: np.full((n,), v, dt)  # noqa: E731
    return Plan(split=full(split), resident=np.tile(np.asarray(resident, np.int32), (n, 1)),
                swap=full(False, bool), codec=full(list(codec_names).index(codec)),
                batch=full(batches.index(batch)))


def offered_rate(timing: ModelTiming, version: int, plans: Sequence[DevicePlan],
                 link_bps: float, utilisation: float) -> tuple[float, dict]:
    """Per-device request rate at which the busiest resource (an end device, a link
    direction or the shared cloud) is ``utilisation`` busy by the cost model's job times,
    and each resource class's predicted utilisation at that rate."""
    c = timing.versions[version]
    b = np.array([p.batch for p in plans], np.float64)
    cloud_only = np.array([p.kind == CLOUD_ONLY for p in plans])
    end_only = np.array([p.kind == END_ONLY for p in plans])
    up = np.where(cloud_only, c.up[0], c.up.sum(0)) * 8.0 / link_bps
    per_request = {"end": c.end.sum(0) / b, "uplink": np.where(end_only, 0.0, up) / b,
                   "downlink": np.where(end_only, 0.0, c.down.sum(0)) * 8.0 / link_bps / b}
    coef = {k: float(v.max()) for k, v in per_request.items()}
    coef["cloud"] = float((c.cloud.sum(0) / b).sum())
    rate = utilisation / max(coef.values())
    return rate, {k: v * rate for k, v in coef.items()}


def _cpu_counters() -> tuple[float, float, float] | None:
    """(wall s, busy CPU s of the whole machine, CPU s of this process) on Linux."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    t = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # not idle/iowait
    return time.perf_counter(), busy, t.user + t.system


def other_cpu_share(start, stop) -> float | None:
    """Share of the machine's CPU time that other processes (and the hypervisor's steal)
    used between two :func:`_cpu_counters` samples: contention the real side suffers and
    the simulated side does not model."""
    if start is None or stop is None or stop[0] <= start[0]:
        return None
    others = (stop[1] - start[1]) - (stop[2] - start[2])
    return max(others, 0.0) / ((stop[0] - start[0]) * (os.cpu_count() or 1))


def simulate(timing, plans: Sequence[DevicePlan], arrivals, horizon_s: float, gen_tokens: int,
             link: LinkProfile = LINK) -> Result:
    """One simulation of ``plans`` (one per device) over constant links."""
    n, trace = len(plans), BandwidthTrace.constant(link.bandwidth_bps)
    return Simulator(timing, StaticController(plans), [trace] * n, [trace] * n,
                     [link.rtt_s] * n, gen_tokens).run(arrivals, horizon_s)


def metrics(res: Result) -> dict:
    """Mean and p95 latency, mean TTFT (decoding) and throughput = completed requests /
    the time of the last completion, over every request."""
    lat = np.array([r.done - r.arrival for r in res.requests])
    out = {"requests": len(lat), "latency_mean_s": float(lat.mean()),
           "latency_p95_s": float(np.quantile(lat, 0.95)),
           "throughput_rps": len(lat) / max(r.done for r in res.requests)}
    if res.gen_tokens > 0:
        out["ttft_mean_s"] = float(np.mean([r.ttft for r in res.requests]))
    return out


def rel_errors(sim: dict, real: dict) -> dict:
    """Signed (sim - real) / real of every shared metric but the request count."""
    return {k: (sim[k] - real[k]) / real[k] for k in real if k != "requests"}


@dataclasses.dataclass
class _World:
    """What every run shares: the model, its stages per plan kind, inputs, calibrations."""

    setup: Any
    params: Any
    freq: np.ndarray
    meshes: tuple
    workdir: str
    train_tokens: np.ndarray
    texts: np.ndarray  # [R, T + 1]
    prompts: np.ndarray  # [R, P]
    profile: Any
    end_cal: Any
    cloud_cal: Any
    codecs: list
    gen_tokens: int = 16
    stages: dict = dataclasses.field(default_factory=dict)  # kind -> (Stages, info)
    warm: set = dataclasses.field(default_factory=set)

    def instance(self, n: int, workload: str) -> Instance:
        from ec2moe_jax.models.costs import model_costs
        from ec2moe_jax.scheduler import build_instance

        t, g = ((self.texts.shape[1] - 1, 0) if workload == "score"
                else (self.prompts.shape[1], self.gen_tokens))
        return build_instance(model_costs(self.setup.cfg.model), self.freq,
                              [self.profile] * n, self.profile, [LINK] * n, [1.0] * n,
                              prompt_tokens=t, gen_tokens=g, calibration=self.end_cal,
                              cloud_calibration=self.cloud_cal, codecs=self.codecs,
                              batch_sizes=(1, 2, 4))

    def stages_for(self, kind: str, inst: Instance) -> Stages:
        from ec2moe_jax.pipeline import runtime
        from ec2moe_jax.pipeline.plans import from_scheduler

        if kind not in self.stages:
            names = [c.name for c in self.codecs]
            pplan = from_scheduler(scheduler_plan(kind, inst, names), inst,
                                   self.setup.cfg.model, kind)
            self.stages[kind] = runtime.prepare(
                self.setup.model, self.params, pplan, *self.meshes, frequencies=self.freq,
                workdir=self.workdir, train_tokens=self.train_tokens)
        return self.stages[kind][0]

    def real_timing(self, kind: str, workload: str, stages: Stages, seed: int) -> RealTiming:
        rt = RealTiming(stages, self.texts if workload == "score" else self.prompts,
                        gen_tokens=0 if workload == "score" else self.gen_tokens, seed=seed)
        if (kind, workload) not in self.warm:
            rt.warm_up(range(1, PLANS[kind][3] + 1))
            self.warm.add((kind, workload))
        return rt


def _load_world(workdir: str, score_tokens: int, prompt_tokens: int, gen_tokens: int,
                calibration, pipeline_calibration, codec_sweep, rows: int = 64) -> _World:
    from ec2moe_jax.scheduler import codec_options, this_cpu
    from ec2moe_jax.sharding import split_end_cloud
    from ec2moe_jax.training import load_run

    ckpt = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(ckpt) and os.listdir(ckpt)):
        raise ValueError(f"no trained checkpoint under {ckpt!r}: the validation runs the "
                         f"trained small model; train it with `{TRAIN_COMMAND}` (or pass "
                         "another workdir)")
    setup, params, splits, freq = load_run(workdir)
    cfg = setup.cfg.model
    meshes = split_end_cloud(setup.cfg.mesh)
    profile, end_cal, cloud_cal = this_cpu(cfg, calibration, pipeline_calibration)
    test = np.asarray(splits.test)
    starts = np.linspace(0, len(test) - score_tokens - 2, rows).astype(int)
    texts = np.stack([test[s:s + score_tokens + 1] for s in starts]).astype(np.int32)
    prompts = np.stack([test[s:s + prompt_tokens] for s in starts]).astype(np.int32)
    codecs = [c for c in codec_options(cfg.d_model, codec_sweep) if c.name in
              {p[2] for p in PLANS.values()}]
    return _World(setup, params, freq, meshes, workdir, np.asarray(splits.train), texts,
                  prompts, profile, end_cal, cloud_cal, codecs, gen_tokens=gen_tokens)


def _recalibrate(world: _World, progress: bool, calibration) -> tuple[_World, dict]:
    """The world with end and cloud calibrations refitted now on the stages at splits 1 and
    3 (measured on this machine), and the fit's own summary."""
    from ec2moe_jax.bench.pipeline_calibration import calibrate
    from ec2moe_jax.scheduler import Calibration

    if progress:
        print("sim validation: refitting the stage model on splits 1 and 3 (measured now)")
    rec = calibrate(world.setup.model, world.params, world.meshes, LINK, freq=world.freq,
                    prompt=world.prompts[:1], texts=world.texts[:4], gen_tokens=16,
                    fit_splits=(1, 3), repeats=3, calibration=calibration)
    fits = rec["calibrations"]
    end = Calibration.from_fit(fits["refit_end"], "end: " + fits["refit_end"]["source"])
    cloud = Calibration.from_fit(fits["refit_cloud"], "cloud: " + fits["refit_cloud"]["source"])
    return (dataclasses.replace(world, end_cal=end, cloud_cal=cloud),
            {"end": fits["refit_end"], "cloud": fits["refit_cloud"],
             "fit_summary": rec.get("summary")})


def _one_run(world: _World, n: int, workload: str, kind: str, *, seed: int,
             requests: int, utilisation: float) -> dict:
    """One (devices, workload, plan) run: real and simulated on the same arrivals."""
    inst = world.instance(n, workload)
    names = [c.name for c in world.codecs]
    plan = scheduler_plan(kind, inst, names)
    model = ModelTiming(inst)
    version = model.register(plan)
    plans = device_plans(inst, plan, version)
    rate, util = offered_rate(model, version, plans, LINK.bandwidth_bps, utilisation)
    horizon = requests / (n * rate)
    arrivals = poisson_arrivals([rate] * n, horizon, seed)
    stages = world.stages_for(kind, inst)
    rt = world.real_timing(kind, workload, stages, seed)
    c0, t0 = _cpu_counters(), time.perf_counter()
    real = metrics(simulate(rt, plans, arrivals, horizon, rt.gen))
    wall = time.perf_counter() - t0
    contention = other_cpu_share(c0, _cpu_counters())
    sim = metrics(simulate(model, plans, arrivals, horizon, rt.gen))
    return {"devices": n, "workload": workload, "plan": kind,
            "pipeline_plan": world.stages[kind][1], "rate_per_device_rps": rate,
            "horizon_s": horizon, "offered_requests": int(sum(len(a) for a in arrivals)),
            "predicted_utilisation": util, "real": real, "sim": sim,
            "rel_error": rel_errors(sim, real), "real_wall_s": wall,
            "other_processes_cpu_share": contention,
            "stage_seconds": _stage_table(model.versions[version], rt.charged)}


def _stage_table(costs, charged: dict[str, list[float]]) -> dict:
    """Per job kind: the median measured seconds of device 0's plan kind (what RealTiming
    charged, hop included) against the cost model's (ModelTiming, decode steps averaged)."""
    pred = {"end_score": costs.end[0, 0], "cloud_score": costs.cloud[0, 0],
            "end_prefill": costs.end[0, 0], "cloud_prefill": costs.cloud[0, 0],
            "end_step": costs.end[1:, 0].mean() if len(costs.end) > 1 else np.nan,
            "cloud_step": costs.cloud[1:, 0].mean() if len(costs.cloud) > 1 else np.nan}
    out = {}
    for k, v in charged.items():
        real, sim = float(np.median(v)), float(pred[k])
        out[k] = {"real_median_s": real, "sim_s": sim, "rel_error": (sim - real) / real,
                  "calls": len(v)}
    return out


def _cross_check(world: _World, workload: str, kind: str, n_requests: int) -> dict:
    """One device, every request at t = 0: the simulator with real stages against the
    executor on the same requests (both measured, each on its own run)."""
    inst = world.instance(1, workload)
    stages = world.stages_for(kind, inst)
    b = PLANS[kind][3]
    rt = world.real_timing(kind, workload, stages, 0)
    plan = DevicePlan(stages.split, b, kind)
    res = simulate(rt, [plan], [np.zeros(n_requests)], 1.0, rt.gen)
    ch = Channel.from_profile(LINK)
    rows = rt.texts[np.arange(n_requests) % len(rt.texts)]
    got = np.stack([rt.outputs[i] for i in range(n_requests)])
    if workload == "score":
        out, rep = executor.score(stages, rows, channel=ch, micro_batch=b)
        same = bool(np.allclose(got, out, rtol=1e-4, atol=1e-4))
    else:
        out, rep = executor.generate(stages, rows, rt.gen, channel=ch, micro_batch=b)
        same = bool(np.array_equal(got, out))
    sim_lat = np.array([r.done - r.arrival for r in res.requests])
    ex_lat = np.array([r.latency_s for r in rep.requests])
    sim_m, ex_m = float(sim_lat.max()), rep.makespan_s
    total = lambda seconds: float(sum(map(sum, seconds.values())))  # noqa: E731
    return {"workload": workload, "plan": kind, "requests": n_requests, "micro_batch": b,
            "sim_real_timing": {"makespan_s": sim_m, "latency_mean_s": float(sim_lat.mean()),
                                "stage_seconds_total": total(rt.seconds)},
            "executor": {"makespan_s": ex_m, "latency_mean_s": float(ex_lat.mean()),
                         "stage_seconds_total": total(rep.stage_seconds)},
            "makespan_rel_diff": (sim_m - ex_m) / ex_m,
            "latency_mean_rel_diff": float((sim_lat.mean() - ex_lat.mean()) / ex_lat.mean()),
            "bytes_equal": bool(sum(r.bytes_up for r in res.requests) == rep.bytes_up
                                and sum(r.bytes_down for r in res.requests) == rep.bytes_down),
            "outputs_equal": same}


def _errors(runs: list[dict], tolerance: float) -> dict:
    lat = np.abs([r["rel_error"]["latency_mean_s"] for r in runs])
    every = np.abs([e for r in runs for e in r["rel_error"].values()])
    worst = max(runs, key=lambda r: abs(r["rel_error"]["latency_mean_s"]))
    return {"runs": len(runs),
            "latency_mean_abs_rel_error": {"median": float(np.median(lat)),
                                           "max": float(lat.max())},
            "all_metrics_abs_rel_error": {"median": float(np.median(every)),
                                          "max": float(every.max()), "count": int(every.size)},
            f"every_mean_latency_within_{tolerance:.0%}": bool(np.all(lat <= tolerance)),
            "worst_mean_latency": {k: worst[k] for k in ("devices", "workload", "plan")}
            | {"rel_error": worst["rel_error"]["latency_mean_s"]}}


def _summary(runs: list[dict], tolerance: float, quiet: float = 0.1) -> dict:
    """Errors over every run, and over the runs during which other processes used less
    than ``quiet`` of the machine's CPU time."""
    share = [r["other_processes_cpu_share"] for r in runs]
    calm = [r for r, c in zip(runs, share, strict=True) if c is not None and c < quiet]
    return {"all_runs": _errors(runs, tolerance),
            f"quiet_runs (other processes < {quiet:.0%} CPU)":
                _errors(calm, tolerance) if calm else None,
            "other_processes_cpu_share_max": max((c for c in share if c is not None),
                                                 default=None)}


def validate(workdir: str = "runs/small", devices: Sequence[int] = (1, 2, 4), *,
             calibration: str, codec_sweep, pipeline_calibration: str | None = None,
             seed: int = 0, progress: bool = True, plans: Sequence[str] = tuple(PLANS),
             workloads: Sequence[str] = ("score", "generate"), requests: int = 30,
             utilisation: float = 0.6, score_tokens: int = 128, prompt_tokens: int = 16,
             gen_tokens: int = 16, cross_check_requests: int = 4,
             tolerance: float = 0.2, recalibrate: bool = True) -> dict:
    """Simulated vs real runs of the trained model in ``workdir`` for every device count,
    workload and plan kind, plus the engine cross-check; JSON-ready.

    Args:
      devices: end-device counts N sharing the cloud.
      calibration, pipeline_calibration: this CPU's calibration files (see
        :func:`ec2moe_jax.scheduler.this_cpu`); codec_sweep: ``ec2moe codec-sweep``'s record
        or its path.
      seed: arrivals of run ``i`` use ``seed + i``.
      plans: plan kinds of :data:`PLANS`.
      requests: about how many requests each run offers (all devices together).
      utilisation: the busiest resource's utilisation by the cost model's job times.
      tolerance: the relative error the mean latencies must stay within.
      recalibrate: first refit the per-submesh stage model on this machine, now, from the
        pipeline stages at splits 1 and 3 only (:func:`~.pipeline_calibration.calibrate`;
        the validated plans run splits 0, 2 and L, so none of them is fitted on). This
        machine's speed drifts between sessions by more than the tolerance, so a calibration
        from another session is not a fair test of the simulator. ``False`` uses
        ``pipeline_calibration`` (the single-device fit when None).

    Returns:
      ``{"runs": [...], "summary": {...}, "cross_check": [...], ...}``; every run holds
      ``real`` (:data:`REAL_LABEL`), ``sim`` (:data:`SIM_LABEL`) and their ``rel_error``.
    """
    from tqdm.auto import tqdm

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    world = _load_world(workdir, score_tokens, prompt_tokens, gen_tokens, calibration,
                        pipeline_calibration, codec_sweep)
    fresh = None
    if recalibrate:
        world, fresh = _recalibrate(world, progress, calibration)
    grid = [(n, w, k) for w in workloads for k in plans for n in devices]
    bar = tqdm(total=len(grid) + len(plans) * len(workloads), disable=not progress,
               desc="sim validation")
    runs = []
    for i, (n, w, k) in enumerate(grid):
        bar.set_postfix_str(f"N={n} {w} {k}")
        runs.append(_one_run(world, n, w, k, seed=seed + i, requests=requests,
                             utilisation=utilisation))
        bar.update()
    checks = []
    for w in workloads:
        for k in plans:
            bar.set_postfix_str(f"cross-check {w} {k}")
            checks.append(_cross_check(world, w, k, cross_check_requests))
            bar.update()
    bar.close()
    return {"benchmark": "sim_validation", "workdir": workdir,
            "real_method": REAL_LABEL, "sim_method": SIM_LABEL,
            "link": dataclasses.asdict(LINK), "utilisation_target": utilisation,
            "workloads": {"score": {"scored_tokens": score_tokens},
                          "generate": {"prompt_tokens": prompt_tokens,
                                       "gen_tokens": gen_tokens}},
            "plans": {k: dict(zip(("split", "resident_fraction", "codec", "micro_batch"), v,
                                  strict=True)) for k, v in PLANS.items() if k in plans},
            "calibration": {"end": dataclasses.asdict(world.end_cal),
                            "cloud": dataclasses.asdict(world.cloud_cal),
                            "fitted_now": fresh},
            "metrics": "latency over every request; throughput = completed requests / time "
                       "of the last completion; rel_error = (sim - real) / real",
            "runs": runs, "summary": _summary(runs, tolerance),
            "cross_check_method": "N = 1, every request at t = 0: the simulator with "
                                  "RealTiming vs executor.score/generate, both "
                                  f"{REAL_LABEL}, each measured on its own run",
            "cross_check": checks, "wall_seconds": time.perf_counter() - t0,
            "machine": {"cpus": os.cpu_count(), "load_average_1min_start": load0,
                        "load_average_1min_end": os.getloadavg()[0],
                        "note": "measured stage times assume a quiet machine: other "
                                "processes on these cores slow the real side only"}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/small")
    ap.add_argument("--devices", default="1,2,4")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--calibration", default="results/calibration_cpu.json")
    ap.add_argument("--codec-sweep", default="results/codec_sweep.json")
    args = ap.parse_args(argv)
    res = validate(args.workdir, tuple(int(d) for d in args.devices.split(",")),
                   seed=args.seed, calibration=args.calibration, codec_sweep=args.codec_sweep)
    if args.out:
        write_text_atomic(args.out, json.dumps(res, indent=2, default=float) + "\n")
    print(json.dumps(res["summary"], indent=2))
    return res


if __name__ == "__main__":  # JAX_NUM_CPU_DEVICES=8 python -m ec2moe_jax.bench.sim_validation
    main()
