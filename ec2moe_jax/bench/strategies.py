"""Strategies the evaluation compares, as simulator controllers (*ours*).

Shape legend: N end devices, L layers.

- ``ec2moe``: the route-aware scheduler on the devices' *live* profiles (free memory and
  background load), HL-GGN group gate on dropped-expert layers, codec, micro-batching, and
  re-planning (EMA + hysteresis, :mod:`ec2moe_jax.scheduler.replan`) on the bandwidth each
  device measured over the last interval.
- ``ec2moe-lossless``: EC2MoE with a quality budget that drops nothing (every end expert
  resident or swapped in from storage; codecs within the budget still allowed), a variant
  for where dropped experts cost too much quality.
- ablations: ``no-hw-selection`` plans on the spec-sheet profiles (no background load, all
  memory free) and the plan then runs on the live device, whose runtime keeps what fits
  (least-used experts out first, swapped in from storage on use; a shallower split if even
  the layers do not fit); ``masked-top-k`` is EC2MoE's plan with the plain router over the
  resident experts instead of the group gate (same timing by construction: the cost model
  does not tell the two gates apart, the gate's FLOPs being 6-19% of the router's); ``no-codec``
  may only send the bf16 hidden state; ``static`` is EC2MoE's first plan, never re-planned.
- baselines: ``cloud-only``, ``end-only`` (EdgeMoE-style: what does not fit is swapped from
  storage, or dropped if that is faster and the quality budget allows it) and ``best-split``
  (Neurosurgeon-style: the best uniform split, no codec, experts that fit resident). Every
  baseline gets the best micro-batch size for the offered load (the cost model picks it),
  so EC2MoE's advantage cannot come from batching alone. Baselines do not re-plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.bench import sim
from ec2moe_jax.pipeline.link import BandwidthTrace
from ec2moe_jax.scheduler.candidates import (
    COVER,
    FIT,
    SWAP,
    candidate_index,
    candidates,
    flatten,
    take,
)
from ec2moe_jax.scheduler.heuristic import schedule
from ec2moe_jax.scheduler.model import Instance, Plan, evaluate
from ec2moe_jax.scheduler.plan import _flat_candidates
from ec2moe_jax.scheduler.replan import Observation, make_replanner

EC2MOE = "ec2moe"
LOSSLESS = "ec2moe-lossless"
ABLATIONS = ("no-hw-selection", "masked-top-k", "no-codec", "static")
BASELINES = ("cloud-only", "end-only", "best-split")
STRATEGIES = (EC2MOE, LOSSLESS, *ABLATIONS, *BASELINES)
# Strategies whose end layers route with the group gate when experts are dropped.
GROUP_GATE = {EC2MOE, LOSSLESS, "no-hw-selection", "no-codec", "static"}


@dataclasses.dataclass
class Setting:
    """One regime at one offered load: the instances each strategy plans on and the
    links every strategy shares.

    live: live end profiles, the links' nominal (mean) bandwidth, the offered rates.
    spec: the same with spec-sheet end profiles (``no-hw-selection`` plans on it).
    no_codec: ``live`` with the bf16 transport as the only codec option.
    lossless: ``live`` with ``min_coverage = 1`` (no expert may be dropped).
    """

    live: Instance
    spec: Instance
    no_codec: Instance
    lossless: Instance
    up: Sequence[BandwidthTrace]
    down: Sequence[BandwidthTrace]
    rtt: Sequence[float]
    private: bool


@jax.jit
def _uniform_objectives(inst: Instance, index: jax.Array) -> jax.Array:
    """Objective of every uniform joint plan (all devices on flat candidate ``index[k]``)."""
    cands = flatten(inst, candidates(inst))
    n = inst.num_devices
    return jax.vmap(lambda i: evaluate(inst, take(cands, jnp.full((n,), i)))["objective"])(
        index)


def baseline_plan(inst: Instance, name: str) -> Plan:
    """The best (lowest objective) uniform plan of a baseline family over micro-batch
    sizes (and splits for ``best-split``, residency for ``end-only``)."""
    L, B = inst.num_layers, int(inst.batch.shape[0])
    if name == "cloud-only":
        options = [(0, COVER)]
    elif name == "end-only":
        options = [(L, FIT), (L, SWAP)]
    elif name == "best-split":
        options = [(s, FIT) for s in range(1, L)]
    else:
        raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINES}")
    index = jnp.asarray([int(candidate_index(inst, s, r, 0, b)) for s, r in options
                         for b in range(B)], jnp.int32)
    best = index[int(jnp.argmin(_uniform_objectives(inst, index)))]
    return take(_flat_candidates(inst), jnp.full((inst.num_devices,), best))


def realise(live: Instance, plan: Plan) -> Plan:
    """What a plan made for the spec sheet becomes on the live device: if its end weights
    do not fit the live memory, the least-used resident experts are evicted and swapped in
    from storage on use (one slot kept as the swap buffer); if the layers alone do not fit,
    the split moves toward the cloud until they do."""
    inst = jax.device_get(live)
    split = np.asarray(plan.split).copy()
    res = np.asarray(plan.resident).copy()
    swap = np.asarray(plan.swap).copy()
    L = live.num_layers
    moe = np.asarray(inst.is_moe) > 0
    freq = np.asarray(inst.freq)
    eb = float(inst.end_expert_bytes)
    bsz = np.asarray(inst.batch)[np.asarray(plan.batch)]
    ctx = float(inst.prompt_tokens + inst.gen_tokens)

    def memory(i, s, r, sw):
        layers = np.arange(L) < s
        w = np.sum(layers * (np.asarray(inst.fixed_bytes) + moe * eb * r))
        kv = s * float(inst.kv_bytes) * ctx * bsz[i]
        head = float(inst.head_bytes) if s == L else 0.0
        return 0.0 if s == 0 else float(inst.embed_bytes) + w + kv + (eb if sw else 0) + head

    for i in range(live.num_devices):
        cap = float(inst.end_mem[i])
        while split[i] > 0 and memory(i, split[i], res[i], swap[i]) > cap:
            held = [(freq[k, res[i, k] - 1], k) for k in range(split[i])
                    if moe[k] and res[i, k] > 0]
            if held:
                res[i, min(held)[1]] -= 1
                swap[i] = True
            else:
                split[i] -= 1
                res[i, split[i]:] = 0
        if split[i] == 0:
            res[i] = 0
            swap[i] = False
    return Plan(split=jnp.asarray(split, jnp.int32), resident=jnp.asarray(res, jnp.int32),
                swap=jnp.asarray(swap), codec=plan.codec, batch=plan.batch)


class PlanController:
    """A strategy's plans over time for :class:`~ec2moe_jax.bench.sim.Simulator`.

    ``plans`` keeps every joint plan it ever ran (by version), so each completed request's
    plan (and hence its quality) is known.
    """

    def __init__(self, timing: sim.ModelTiming, plan: Plan, *, interval_s: float | None = None,
                 replan_on: Instance | None = None, up: Sequence[BandwidthTrace] = (),
                 realise_on: Instance | None = None, counts: np.ndarray | None = None):
        self.timing, self.interval_s = timing, interval_s
        self.realise_on = realise_on
        self.plans: list[Plan] = []
        self.current: list[sim.DevicePlan] = []
        self._install(plan)
        if interval_s:
            self.template = replan_on
            self.rp = make_replanner(replan_on)
            self.state = self.rp.init()
            self.state = self.state.replace(plan=plan)
            self.up = list(up)
            self.counts = jnp.asarray(counts, jnp.float32)

    def _install(self, plan: Plan) -> None:
        run = realise(self.realise_on, plan) if self.realise_on is not None else plan
        version = self.timing.register(run)
        self.plans.append(jax.device_get(run))
        self.current = sim.device_plans(self.timing.inst, run, version)

    def plan(self, device: int) -> sim.DevicePlan:
        return self.current[device]

    def tick(self, t: float, simulator: sim.Simulator) -> None:
        a = max(0.0, t - self.interval_s)
        bps = jnp.asarray([tr.mean_bps(a, t) for tr in self.up], jnp.float32)
        obs = Observation(self.counts, bps, self.template.rtt, self.template.rate)
        before = int(self.state.switches)
        plan, self.state = self.rp.update(obs, self.state)
        if int(self.state.switches) > before:
            old = [(p.split, p.batch) for p in self.current]
            self._install(plan)
            changed = sum(o != (p.split, p.batch) for o, p in zip(old, self.current,
                                                                   strict=True))
            simulator.switches.append((t, changed))


def controller(name: str, setting: Setting, counts: np.ndarray, interval_s: float
               ) -> PlanController:
    """The controller of strategy ``name`` on ``setting`` (timing from the live instance,
    except ``no-codec``, whose instance lists fewer codecs)."""
    live = setting.live
    if name in (EC2MOE, "masked-top-k", "static"):
        plan, _ = schedule(live)
        timing = sim.ModelTiming(live)
        if name == "static":
            return PlanController(timing, plan)
        return PlanController(timing, plan, interval_s=interval_s, replan_on=live,
                              up=setting.up, counts=counts)
    if name == LOSSLESS:
        plan, _ = schedule(setting.lossless)
        return PlanController(sim.ModelTiming(setting.lossless), plan, interval_s=interval_s,
                              replan_on=setting.lossless, up=setting.up, counts=counts)
    if name == "no-codec":
        plan, _ = schedule(setting.no_codec)
        return PlanController(sim.ModelTiming(setting.no_codec), plan, interval_s=interval_s,
                              replan_on=setting.no_codec, up=setting.up, counts=counts)
    if name == "no-hw-selection":
        plan, _ = schedule(setting.spec)
        return PlanController(sim.ModelTiming(live), plan, interval_s=interval_s,
                              replan_on=setting.spec, up=setting.up, realise_on=live,
                              counts=counts)
    if name in BASELINES:
        return PlanController(sim.ModelTiming(live), baseline_plan(live, name))
    raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGIES}")
