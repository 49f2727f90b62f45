"""Plans as the outside world sees them: baseline plans, a checked entry point and a
JSON-ready description. A plan's resident experts as a mask: :func:`ec2moe_jax.routing.
top_n_mask` of the routing frequencies [L, E] and ``plan.resident`` [N, L].

Shape legend: N end devices, L layers, E experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.scheduler.candidates import baseline_indices, candidates, flatten, take
from ec2moe_jax.scheduler.heuristic import schedule
from ec2moe_jax.scheduler.model import Instance, Plan, evaluate

# Op-by-op dispatch of the cost model is slow on CPU; tests share this compilation.
evaluate_jit = _evaluate = jax.jit(evaluate)
_flat_candidates = jax.jit(lambda inst: flatten(inst, candidates(inst)))


def baseline_plans(inst: Instance) -> dict[str, Plan]:
    """Joint baseline plans [N]: cloud_only, end_only_drop (experts that do not fit are
    dropped; coverage < 1 may break the quality budget), end_only_swap (swapped in from
    storage) and best_split (the best uniform single split, no codec, micro-batch 1)."""
    n = inst.num_devices
    cands = _flat_candidates(inst)
    out = {}
    for name, idx in baseline_indices(inst).items():
        plans = [take(cands, jnp.full((n,), i)) for i in np.asarray(idx)]
        if name == "single_split":
            objs = [float(_evaluate(inst, p)["objective"]) for p in plans]
            out["best_split"] = plans[int(np.argmin(objs))]
        else:
            out[name] = plans[0]
    return out


def schedule_checked(inst: Instance, rounds: int = 3) -> tuple[Plan, dict]:
    """:func:`~.heuristic.schedule`, raising ``ValueError`` when no feasible plan exists
    (the documented fallback, cloud-only, is itself infeasible only under privacy)."""
    plan, info = schedule(inst, rounds=rounds)
    if not bool(info["feasible"]):
        bad = np.flatnonzero(np.asarray(_evaluate(inst, plan)["terms"].penalty) > 0).tolist()
        raise ValueError(
            f"no feasible plan for end devices {bad}: min_end_layers="
            f"{np.asarray(inst.min_end_layers)[bad].tolist()} layers do not fit their memory "
            f"({np.asarray(inst.end_mem)[bad].tolist()} bytes) within the quality budget; "
            "lower min_end_layers, relax the quality budget (min_coverage or quality_budget) "
            "or give the device more memory")
    return plan, info


def describe(inst: Instance, plan: Plan) -> dict:
    """JSON-ready summary of a joint plan: objective, latency, utilisation, throughput and
    per-device split / codec name / micro-batch / coverage."""
    ev = _evaluate(inst, plan)
    t = ev["terms"]
    names = [inst.codec_name(c) for c in np.asarray(plan.codec).tolist()]
    L = inst.num_layers
    split = np.asarray(plan.split)
    kind = ["cloud-only" if s == 0 else "end-only" if s == L else "split" for s in split]

    def f(x):
        x = float(x)
        return x if np.isfinite(x) else None

    return {"objective": f(ev["objective"]), "mean_latency_s": f(ev["mean_latency_s"]),
            "cloud_utilisation": f(ev["cloud_utilisation"]),
            "throughput_rps": f(ev["throughput_rps"]), "feasible": bool(ev["feasible"]),
            "split": split.tolist(), "kind": kind, "codec": names,
            "micro_batch": np.asarray(inst.batch)[np.asarray(plan.batch)].astype(int).tolist(),
            "swap": np.asarray(plan.swap).tolist(),
            **({"min_coverage": np.round(np.asarray(t.coverage), 4).tolist()}
               if inst.score_kind == "coverage" else
               {"quality_loss": np.round(-np.asarray(t.coverage), 4).tolist()}),
            "uplink_bytes_per_request": np.round(np.asarray(t.wire_bytes), 1).tolist()}
