"""The route-aware heuristic: vectorised candidate scoring plus best-response rounds.

Shape legend: N end devices, K candidates per device (see :mod:`.candidates`), L layers.

1. Score every device's K candidates at once with :func:`~.model.plan_terms` (candidate
   terms do not depend on the other devices: they couple only through the shared cloud's
   utilisation and wait, which :func:`~.model.combine` adds).
2. Start from the best baseline joint plan (cloud-only, end-only drop/swap, every uniform
   single split without codec).
3. ``rounds`` best-response rounds (``lax.fori_loop``): each device in turn takes the
   candidate minimising the *joint* objective with the others fixed. Each move only ever
   lowers the objective, so the result is never worse than any baseline, and cloud-only or
   end-only come out whenever they are best.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ec2moe_jax.scheduler.candidates import baseline_indices, candidates, flatten, take
from ec2moe_jax.scheduler.model import Instance, Plan, Terms, combine, joint_objective, plan_terms


def _gather(terms: Terms, index: jax.Array) -> Terms:
    n = jnp.arange(index.shape[0])
    return jax.tree.map(lambda x: x[n, index], terms)


def _objective_of(terms: Terms, index: jax.Array) -> jax.Array:
    return joint_objective(_gather(terms, index))[0]


def _best_response(terms: Terms, index: jax.Array, i: jax.Array) -> jax.Array:
    """Device ``i``'s candidate minimising the joint objective, the others fixed."""
    cur = _gather(terms, index)
    others = jnp.arange(index.shape[0]) != i
    w = others.astype(jnp.float32)
    mine = jax.tree.map(lambda x: x[i], terms)  # [K]
    obj = combine(
        (w * cur.rate).sum() + mine.rate,
        (w * cur.rate * cur.latency).sum() + mine.rate * mine.latency,
        (w * cur.rate * cur.visits).sum() + mine.rate * mine.visits,
        (w * cur.cloud_rho).sum() + mine.cloud_rho,
        (w * cur.cloud_s2).sum() + mine.cloud_s2,
        jnp.maximum(jnp.max(jnp.where(others, cur.local_util, 0.0)), mine.local_util),
        (w * cur.penalty).sum() + mine.penalty)[0]
    best = jnp.argmin(obj)
    # Move only on a strict improvement, so rounding cannot make the objective creep up.
    return jnp.where(obj[best] < obj[index[i]] * (1 - 1e-6), best, index[i])


def baseline_objectives(inst: Instance, terms: Terms) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Baseline name -> (objective, candidate index [N]); "best_split" is the best uniform
    single split without codec."""
    n = inst.num_devices
    out = {}
    for name, idx in baseline_indices(inst).items():
        joint = jnp.broadcast_to(idx[:, None], (idx.shape[0], n))
        objs = jax.vmap(lambda j: _objective_of(terms, j))(joint)
        k = jnp.argmin(objs)
        out["best_split" if name == "single_split" else name] = (objs[k], joint[k])
    return out


@functools.partial(jax.jit, static_argnames=("rounds",))
def schedule(inst: Instance, rounds: int = 3) -> tuple[Plan, dict[str, jax.Array]]:
    """EC2MoE's plan for every end device.

    Args:
      inst: the scheduling problem.
      rounds: best-response rounds over all devices.

    Returns:
      (plan [N], info) with info["objective"], info["index"] [N] (candidate indices) and
      info["baselines"] (name -> objective). The plan is infeasible (info["feasible"] false)
      only if no candidate of some device satisfies its constraints (e.g. privacy demands
      end layers that do not fit); :func:`~.plan.schedule_checked` turns that into an error.
    """
    cands = candidates(inst)
    n = inst.num_devices
    terms = flatten(inst, plan_terms(inst, cands, jnp.arange(n).reshape(n, 1, 1, 1, 1)))
    base = baseline_objectives(inst, terms)
    names = list(base)
    objs = jnp.stack([base[k][0] for k in names])
    starts = jnp.stack([base[k][1] for k in names])
    index = starts[jnp.argmin(objs)]
    index = jax.lax.fori_loop(0, rounds * n,
                              lambda t, idx: idx.at[t % n].set(_best_response(terms, idx, t % n)),
                              index)
    obj = _objective_of(terms, index)
    # Guard the guarantee against float rounding of the incremental sums.
    better = obj <= objs.min()
    index = jnp.where(better, index, starts[jnp.argmin(objs)])
    chosen = _gather(terms, index)
    info = {"objective": jnp.minimum(obj, objs.min()), "index": index,
            "feasible": chosen.penalty.sum() == 0,
            "baselines": {k: base[k][0] for k in names}}
    return take(flatten(inst, cands), index), info
