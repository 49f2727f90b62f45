"""The route-aware heuristic: vectorised candidate scoring plus best-response rounds.

Shape legend: N end devices, K candidates per device (see :mod:`.candidates`), L layers.

1. Score every device's K candidates once, outside the best-response loop, with
   :func:`~.scoring.candidate_terms` (prefix sums; equivalent to :func:`~.model.plan_terms`).
   Candidate terms do not depend on the other devices: they couple only through the shared
   cloud's utilisation and wait, which :func:`~.model.combine` adds.
2. Start from the best of the baseline joint plans (cloud-only, end-only drop/swap, every
   uniform single split without codec) and of all uniform joint plans (every device on the
   same candidate).
3. ``rounds`` best-response rounds (``lax.fori_loop``): each device in turn takes the
   candidate minimising the *joint* objective with the others fixed. Each move only ever
   lowers the objective, so the result is never worse than any baseline, and cloud-only or
   end-only come out whenever they are best.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ec2moe_jax.scheduler.candidates import (
    COVER,
    NUM_RESIDENCY,
    FitRanks,
    baseline_indices,
    cover_counts,
)
from ec2moe_jax.scheduler.model import Instance, Plan, Terms, combine, served_terms
from ec2moe_jax.scheduler.scoring import candidate_terms


def _objective_of(stacked, index: jax.Array) -> jax.Array:
    """Joint objective of candidate indices ``index`` [N]."""
    rate, sums, margin = stacked
    n = jnp.arange(index.shape[0])
    tot = sums[n, :, index].sum(0)
    return combine(rate.sum(), *tot, margin)[0]


def _stacked(inst: Instance, terms: Terms) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(rate [N], the summed terms [N, 8, K], the planning margin) from compact candidate
    terms [N, S, R, C, B]: only what the joint objective (:func:`~.model.combine`) needs,
    flattened once."""
    full = (inst.num_devices, inst.num_layers + 1, NUM_RESIDENCY, inst.codec_bytes.shape[0],
            inst.batch.shape[0])
    flat = lambda x: jnp.broadcast_to(x, full).reshape(full[0], -1)  # noqa: E731
    served, margin, capacity = served_terms(terms, inst.max_utilisation)
    sums = jnp.stack([flat(terms.rate * terms.latency), flat(terms.rate * terms.visits),
                      flat(terms.cloud_rho), flat(terms.cloud_s2), flat(served), flat(margin),
                      flat(capacity), flat(terms.penalty)], 1)
    return terms.rate.reshape(-1), sums, inst.max_utilisation


def _best_responses(stacked, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every device's best response at once: (candidate [N], joint objective [N] if that
    device alone switched to it, the others fixed)."""
    rate, sums, margin = stacked
    n = jnp.arange(index.shape[0])
    own = sums[n, :, index]  # [N, 8]
    others = own.sum(0) - own  # [N, 8]
    part = [others[:, j, None] + sums[:, j] for j in range(8)]  # [N, K] each
    obj = combine(rate.sum(), *part, margin)[0]
    best = jnp.argmin(obj, -1)
    return best, obj[n, best]


def _improve(stacked, index: jax.Array, rounds: int) -> jax.Array:
    """Best-response dynamics, vectorised over devices: each step computes every device's
    best response, then moves all improving devices at once if that lowers the joint
    objective, else only the single best mover. Every accepted step lowers the exactly
    recomputed objective, so the result is never worse than the start; it stops at a point
    where no single device can improve (or after ``rounds * N`` steps)."""
    n = index.shape[0]

    def cond(carry):
        t, _, _, moved = carry
        return moved & (t < rounds * n)

    def body(carry):
        t, idx, cur, _ = carry
        best, obj = _best_responses(stacked, idx)
        better = obj < cur * (1 - 1e-6)
        joint = jnp.where(better, best, idx)
        i = jnp.argmin(obj)
        single = idx.at[i].set(jnp.where(better[i], best[i], idx[i]))
        o_joint, o_single = _objective_of(stacked, joint), _objective_of(stacked, single)
        new, o_new = jax.lax.cond(o_joint <= o_single, lambda: (joint, o_joint),
                                  lambda: (single, o_single))
        # Move only on a strict improvement, so rounding cannot make the objective creep up.
        moved = o_new < cur * (1 - 1e-6)
        return t + 1, jnp.where(moved, new, idx), jnp.where(moved, o_new, cur), moved

    start = (jnp.zeros((), jnp.int32), index, _objective_of(stacked, index), jnp.array(True))
    return jax.lax.while_loop(cond, body, start)[1]


def baseline_objectives(inst: Instance, stacked) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Baseline name -> (objective, candidate index [N]); "best_split" is the best uniform
    single split without codec."""
    n = inst.num_devices
    out = {}
    for name, idx in baseline_indices(inst).items():
        joint = jnp.broadcast_to(idx[:, None], (idx.shape[0], n))
        objs = jax.vmap(lambda j: _objective_of(stacked, j))(joint)
        k = jnp.argmin(objs)
        out["best_split" if name == "single_split" else name] = (objs[k], joint[k])
    return out


def plan_of(inst: Instance, fr: FitRanks, index: jax.Array) -> Plan:
    """The plans [N] at flat candidate indices ``index`` [N] (``((s R + r) C + c) B + b``)."""
    C, B = inst.codec_bytes.shape[0], inst.batch.shape[0]
    b, rest = index % B, index // B
    c, rest = rest % C, rest // C
    r, s = rest % NUM_RESIDENCY, rest // NUM_RESIDENCY
    n = jnp.arange(index.shape[0])
    fit = fr.per_layer[fr.rank[n, s, b, jnp.clip(r - 1, 0, 1)]]  # [N, L]
    counts = jnp.where((r == COVER)[:, None], cover_counts(inst)[None], fit)
    end = jnp.arange(inst.num_layers)[None] < s[:, None]
    i32 = jnp.int32
    return Plan(split=s.astype(i32), resident=jnp.where(end, counts, 0).astype(i32),
                swap=r == NUM_RESIDENCY - 1, codec=c.astype(i32), batch=b.astype(i32))


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
    compact, fr = candidate_terms(inst)
    stacked = _stacked(inst, compact)
    base = baseline_objectives(inst, stacked)
    names = list(base)
    rate, sums, margin = stacked
    # Every uniform joint plan (all devices on candidate k) at once: one more start, so
    # e.g. "everyone micro-batches" is reachable when no single device can get there alone.
    tot = sums.sum(0)
    uniform = combine(rate.sum(), *tot, margin)[0]
    best_u = jnp.argmin(uniform)
    objs = jnp.stack([base[name][0] for name in names] + [uniform[best_u]])
    starts = jnp.stack([base[name][1] for name in names]
                       + [jnp.full_like(base[names[0]][1], best_u)])
    index = _improve(stacked, starts[jnp.argmin(objs)], rounds)
    obj = _objective_of(stacked, index)
    # Guard the guarantee against float rounding of the incremental sums.
    better = obj <= objs.min()
    index = jnp.where(better, index, starts[jnp.argmin(objs)])
    penalty = stacked[1][jnp.arange(index.shape[0]), 7, index]
    info = {"objective": jnp.minimum(obj, objs.min()), "index": index,
            "feasible": penalty.sum() == 0,
            "baselines": {k: base[k][0] for k in names}}
    return plan_of(inst, fr, index), info
