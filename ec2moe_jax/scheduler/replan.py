"""Re-planning as an optax-style pair: ``init(instance) -> state`` and
``update(observation, state) -> (plan, state)``, pure and jit-able.

Shape legend: M MoE layers, E experts, N end devices, L layers.

Routing statistics are smoothed by an exponential moving average; a new plan replaces the
current one only when it is better by more than the hysteresis margin under the *current*
conditions (for two overloaded plans: the margin on the share of requests they lose; a
stable plan always replaces an overloaded one), so bandwidth jitter inside the band does not
make plans flap. Layers whose new counts are all zero keep their average
(the documented fallback for empty statistics).

Two capacities: candidates are *planned* under the instance's utilisation margin
(``Instance.max_utilisation``, default 0.9: no planned server above 90% of capacity), but the
current plan and the candidate are *compared* against the true capacity. A plan chosen
within the margin therefore stays stable under the bandwidth jitter the hysteresis absorbs,
and a plan that drifts past the margin but not past capacity is kept unless a candidate
beats it by the hysteresis; without the margin, a plan run within a few percent of a link's
capacity turns unstable on every dip and the re-planner flaps.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.scheduler.heuristic import schedule
from ec2moe_jax.scheduler.model import OVERLOADED, UNSTABLE, Instance, Plan, evaluate


@flax.struct.dataclass
class Observation:
    """counts: [M, E] routing counts of the last window; link_bps, rtt, rate: [N]."""

    counts: jax.Array
    link_bps: jax.Array
    rtt: jax.Array
    rate: jax.Array


@flax.struct.dataclass
class ReplanState:
    """freq: [M, E] EMA of routing frequencies (expert identities kept, unsorted);
    plan: the current plan [N]; objective: its objective when last checked; switches:
    plan changes so far; steps: updates so far."""

    freq: jax.Array
    plan: Plan
    objective: jax.Array
    switches: jax.Array
    steps: jax.Array


_evaluate = jax.jit(evaluate)  # init runs outside jit; op-by-op dispatch is slow on CPU


class Replanner(NamedTuple):
    init: callable
    update: callable


def make_replanner(template: Instance, *, decay: float = 0.8, hysteresis: float = 0.1,
                   rounds: int = 3, max_utilisation: float | None = None) -> Replanner:
    """Builds ``(init, update)`` closing over the hyperparameters.

    Args:
      template: the instance whose model, devices and options stay fixed; observations
        replace its statistics, bandwidths, RTTs and request rates.
      decay: EMA weight of the old statistics, in [0, 1).
      hysteresis: relative improvement a new plan needs to replace the current one.
      max_utilisation: the planning margin in (0, 1] (default: the template's,
        ``Instance.max_utilisation``, 0.9 unless set); 1 plans right up to capacity.

    Raises:
      ValueError: a hyperparameter out of range (named with its value).
    """
    if not 0 <= decay < 1:
        raise ValueError(f"{decay=} must lie in [0, 1)")
    if not hysteresis >= 0:
        raise ValueError(f"{hysteresis=} must be >= 0")
    if max_utilisation is not None:
        if not 0 < max_utilisation <= 1:
            raise ValueError(f"{max_utilisation=} must lie in (0, 1] (a share of capacity)")
        template = template.replace(max_utilisation=np.float32(max_utilisation))
    moe_rows = tuple(int(r) for r in np.flatnonzero(np.asarray(template.is_moe) > 0))
    hyper = dict(moe_rows=moe_rows, decay=float(decay), hysteresis=float(hysteresis),
                 rounds=int(rounds))

    def init(freq: jax.Array | None = None) -> ReplanState:
        """State planned for the template (``freq`` [M, E]: initial statistics, default the
        template's, whose expert identities are then the sorted order)."""
        f = template.freq[np.asarray(moe_rows)] if freq is None else jnp.asarray(freq,
                                                                                 jnp.float32)
        f = f / jnp.maximum(f.sum(-1, keepdims=True), 1e-30)
        inst = _instance(template, f, None, moe_rows)
        plan, _ = schedule(inst, rounds=rounds)
        objective = _evaluate(_true_capacity(inst), plan)["objective"]
        return ReplanState(f, plan, objective, jnp.zeros((), jnp.int32),
                           jnp.zeros((), jnp.int32))

    def update(obs: Observation, state: ReplanState) -> tuple[Plan, ReplanState]:
        return _update(template, obs, state, **hyper)

    return Replanner(init, update)


def _instance(template: Instance, freq: jax.Array, obs: Observation | None,
              moe_rows: tuple[int, ...]) -> Instance:
    """The template with statistics ``freq`` [M, E] (sorted per layer) and, if given, the
    observed bandwidths, RTTs and request rates."""
    rows = np.asarray(moe_rows)
    inst = template.replace(freq=template.freq.at[rows].set(-jnp.sort(-freq, axis=-1)))
    if obs is not None:
        inst = inst.replace(link_bps=obs.link_bps.astype(jnp.float32),
                            rtt=obs.rtt.astype(jnp.float32),
                            rate=obs.rate.astype(jnp.float32))
    return inst


def _true_capacity(inst: Instance) -> Instance:
    """``inst`` scored against the servers' true capacity (no planning margin)."""
    return inst.replace(max_utilisation=jnp.ones_like(inst.max_utilisation))


@functools.partial(jax.jit, static_argnames=("moe_rows", "decay", "hysteresis", "rounds"))
def _update(template: Instance, obs: Observation, state: ReplanState, *,
            moe_rows: tuple[int, ...], decay: float, hysteresis: float, rounds: int
            ) -> tuple[Plan, ReplanState]:
    """One re-planning step. The template is an argument, not a closed-over constant, so
    one compilation serves every instance of the same shape (an evaluation harness builds
    hundreds)."""
    counts = jnp.asarray(obs.counts, jnp.float32)
    tot = counts.sum(-1, keepdims=True)
    new = counts / jnp.maximum(tot, 1e-30)
    freq = jnp.where(tot > 0, decay * state.freq + (1 - decay) * new, state.freq)
    inst = _instance(template, freq, obs, moe_rows)
    cand, info = schedule(inst, rounds=rounds)  # planned within the margin if possible
    true = _true_capacity(inst)
    current = evaluate(true, state.plan)["objective"]
    new = evaluate(true, cand)["objective"]
    # Current plan stable (below capacity): only a candidate within the margin may replace
    # it, and only if better by the hysteresis; a candidate over the margin is never moved
    # to, since a few percent of jitter would push it past capacity and back. Current plan
    # overloaded: a stable plan always wins; between overloaded plans the hysteresis applies
    # to their excess over OVERLOADED (mostly the share of requests lost), so plans do not
    # flap while the link is down.
    switch = jnp.where(current >= UNSTABLE,
                       (new < UNSTABLE) | ((new - OVERLOADED) * (1 + hysteresis)
                                          < (current - OVERLOADED)),
                       (info["objective"] < UNSTABLE) & (current > new * (1 + hysteresis)))
    plan = jax.tree.map(lambda a, b: jnp.where(switch, a, b), cand, state.plan)
    obj = jnp.where(switch, new, current)
    return plan, ReplanState(freq, plan, obj, state.switches + switch, state.steps + 1)
