"""Exhaustive optimum of small instances (NumPy enumeration over joint plans).

Shape legend: N end devices, L layers, E experts, P plans of one device.

Per device it enumerates every split, every resident count ``n[l]`` in ``[top_k, E]`` for
each end MoE layer (top-n by routing mass dominates any other subset of n experts: same
cost, more coverage), swap or not, every codec and micro-batch option: a superset of the
heuristic's candidates. Each plan is scored by the same :func:`~.model.plan_terms`.

The joint objective is non-decreasing in every per-device term (latency, cloud visits,
cloud utilisation, cloud ``sum(r S^2)``, local utilisation, violations), so a device's
Pareto-dominated plans can never be part of a unique optimum: they are pruned before the
joint product, which keeps the search exact while making 3-4 devices affordable.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.scheduler.model import Instance, Plan, combine, plan_terms

MAX_JOINT = 20_000_000
_plan_terms = jax.jit(plan_terms)  # op-by-op dispatch of the cost model is slow on CPU
_combine = jax.jit(lambda margin, *sums: combine(*sums, margin)[0])


def _joint_objective(margin, *sums: np.ndarray) -> np.ndarray:
    """:func:`~.model.combine`'s objective of flat joint sums under the planning ``margin``
    (``Instance.max_utilisation``), in float32 like the heuristic; padded to a power of two
    so that few sizes compile."""
    size = 1 << max(int(sums[0].size - 1).bit_length(), 4)
    pad = [np.pad(np.asarray(x, np.float32), (0, size - x.size), constant_values=1.0)
           for x in sums]
    return np.asarray(_combine(margin, *pad))


def device_plans(inst: Instance) -> Plan:
    """Every plan of one device, stacked [P] (numpy int arrays)."""
    L, E = inst.num_layers, inst.num_experts
    k = int(inst.top_k)
    moe = np.asarray(inst.is_moe) > 0
    rows = []
    for s in range(L + 1):
        end_moe = [layer for layer in range(s) if moe[layer]]
        for counts in itertools.product(range(k, E + 1), repeat=len(end_moe)):
            res = np.zeros(L, np.int32)
            res[end_moe] = counts
            for swap in ((False, True) if s > 0 else (False,)):
                rows.append((s, res, swap))
    C, B = inst.codec_bytes.shape[0], inst.batch.shape[0]
    split, res, swap, codec, batch = [], [], [], [], []
    for (s, r, w), c, b in itertools.product(rows, range(C), range(B)):
        split.append(s)
        res.append(r)
        swap.append(w)
        codec.append(c)
        batch.append(b)
    return Plan(np.asarray(split, np.int32), np.stack(res), np.asarray(swap),
                np.asarray(codec, np.int32), np.asarray(batch, np.int32))


def _pareto(cols: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Indices of the rows of ``cols`` [P, F] not dominated by another (lower is better;
    of identical rows the first is kept)."""
    vals, first = np.unique(cols, axis=0, return_index=True)
    keep = np.ones(len(vals), bool)
    for lo in range(0, len(vals), chunk):
        v = vals[lo:lo + chunk, None, :]
        dominated = np.all(vals[None] <= v, -1) & np.any(vals[None] < v, -1)
        keep[lo:lo + chunk] = ~dominated.any(-1)
    return first[keep]


def optimum(inst: Instance) -> tuple[float, Plan]:
    """(optimal objective, optimal joint plan [N]) by exhaustive search.

    Raises:
      ValueError: when the pruned joint space exceeds ``MAX_JOINT`` plans.
    """
    plans = device_plans(inst)
    n = inst.num_devices
    terms = _plan_terms(inst, Plan(*(jnp.asarray(x) for x in (
        plans.split[None], plans.resident[None], plans.swap[None], plans.codec[None],
        plans.batch[None]))), jnp.arange(n)[:, None])
    terms = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x, np.float64),
                                                   (n, plans.split.shape[0])), terms)
    kept = []
    for i in range(n):
        cols = np.stack([terms.latency[i], terms.visits[i], terms.cloud_rho[i],
                         terms.cloud_s2[i], terms.local_util[i], terms.penalty[i]], -1)
        cols = np.where(np.isfinite(cols), cols, 1e30)
        kept.append(_pareto(cols))
    size = int(np.prod([len(k) for k in kept]))
    if size > MAX_JOINT:
        raise ValueError(f"exhaustive search over {size} joint plans (after pruning) exceeds "
                         f"{MAX_JOINT}; use a smaller instance (fewer devices/layers/experts)")
    sums = [np.zeros(()) for _ in range(9)]
    margin = np.float32(inst.max_utilisation)  # as the heuristic compares, in float32
    for i, k in enumerate(kept):
        shape = [1] * n
        shape[i] = len(k)
        t = {f: getattr(terms, f)[i, k].reshape(shape) for f in
             ("rate", "latency", "visits", "cloud_rho", "cloud_s2", "local_util", "penalty")}
        util = t["local_util"]
        parts = (t["rate"], t["rate"] * t["latency"], t["rate"] * t["visits"],
                 t["cloud_rho"], t["cloud_s2"], t["rate"] / np.maximum(util, 1.0),
                 (util >= margin).astype(np.float64), (util >= 1.0).astype(np.float64),
                 t["penalty"])
        sums = [a + b for a, b in zip(sums, parts, strict=True)]
    shape = np.broadcast_shapes(*(x.shape for x in sums))
    size = int(np.prod(shape))
    obj = _joint_objective(margin, *(np.broadcast_to(x, shape).reshape(-1)
                                     for x in sums))[:size].reshape(shape)
    flat = int(np.argmin(obj))
    choice = np.unravel_index(flat, obj.shape)
    idx = np.asarray([kept[i][c] for i, c in enumerate(choice)])
    best = Plan(*(np.asarray(x)[idx] for x in (plans.split, plans.resident, plans.swap,
                                               plans.codec, plans.batch)))
    return float(obj.reshape(-1)[flat]), best
