"""An upper bound on any plan's throughput: the compute and link limits of the devices
involved, as a linear program (*ours*).

Shape legend: N end devices, S = L + 1 splits.

For each device ``i`` and split ``s`` take the cheapest per-request demand any plan with that
split can place on each resource: end seconds ``e[i, s]``, cloud seconds ``c[i, s]`` and
uplink seconds ``x[i, s]`` (each minimised separately over micro-batch sizes and codecs).
End residency: only the top-k experts of each end layer where they fit the device's memory
(the quality budget is ignored, which only loosens the bound), else the scheduler's swap
residency (what fits, the rest read from storage; storage reads are the one place the bound
assumes the scheduler's residency is the cheapest swapping one). Every request of device
``i`` is served at *some* split, so with ``r[i, s]`` requests/s of device ``i`` at split
``s``:

    maximise sum_{i, s} r[i, s]
                  s.t.  sum_s r[i, s] e[i, s] <= 1          (each end device)
                        sum_s r[i, s] x[i, s] <= 1          (each uplink, mean bandwidth)
                        sum_{i, s} r[i, s] c[i, s] <= 1     (the shared cloud)
                        r >= 0

Any real plan (one split per device, or a mix over time, any share of the requests per
device) is a feasible point, and its per-resource demands are at least these minima, so the
optimum bounds every plan's sustainable throughput (the closed-loop saturation runs let fast
devices complete more requests than slow ones, so the rates are not tied to be equal).
Queueing, micro-batch filling and the downlink are ignored (they only lower what a plan
achieves). Privacy restricts the splits to ``s >= min_end_layers``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linprog

from ec2moe_jax.scheduler.candidates import fit_counts
from ec2moe_jax.scheduler.model import Instance, Plan, end_memory, job_costs


@functools.partial(jax.jit, static_argnames=("steps",))
def _per_request(inst: Instance, plans: Plan, steps: int) -> dict[str, jax.Array]:
    """Per-request end seconds, cloud seconds, uplink bytes and end bytes held of candidate
    plans [K, N] (vmapped over K): a prefill (or scoring) job plus ``steps`` decode steps,
    divided by the micro-batch size."""
    T, G = inst.prompt_tokens, inst.gen_tokens

    def one(plan):
        b = inst.batch[plan.batch]
        pre = job_costs(inst, plan, T, T / 2.0, jnp.where(G > 0, 1.0, T))
        out = dict(pre)
        if steps:
            ctx = (T + jnp.arange(1, steps + 1, dtype=jnp.float32))[:, None]
            st = job_costs(inst, plan, 1, ctx, 1)
            for k in ("end_s", "cloud_s"):
                out[k] = out[k] + st[k].sum(0)
            # Cloud-only streams its tokens: nothing goes up per step.
            out["up_bytes"] = out["up_bytes"] + jnp.where(plan.split > 0, st["up_bytes"].sum(0),
                                                          0.0)
        per = {k: v / b for k, v in out.items() if k != "down_bytes"}
        per["memory"] = end_memory(inst, plan, b)
        return per

    return jax.vmap(one)(plans)


def cheapest_demands(inst: Instance, mean_bps: np.ndarray) -> dict[str, np.ndarray]:
    """Per-request minimum end, cloud and uplink seconds, each [N, S] (``inf`` where the
    split is not allowed or its layers do not fit the device), with uplink bandwidths
    ``mean_bps`` [N] (bits/s). Residency options: only the top-k experts of each end layer
    (the cheapest, ignoring the quality budget) or, where that does not fit, the scheduler's
    "swap" residency (what fits resident, the rest read from storage)."""
    n, L = inst.num_devices, inst.num_layers
    G = int(inst.gen_tokens)
    C, B = inst.codec_bytes.shape[0], inst.batch.shape[0]
    moe = np.asarray(inst.is_moe) > 0
    swap_counts = np.asarray(fit_counts(inst, 1))  # [N, S, B, L]
    combos = []  # (split, codec, batch, resident [N, L], swap)
    for s in range(L + 1):
        topk = np.broadcast_to(np.where((np.arange(L) < s) & moe, int(inst.top_k), 0), (n, L))
        for c in range(C if 0 < s < L else 1):
            for b in range(B):
                combos.append((s, c, b, topk, False))
                if 0 < s:
                    combos.append((s, c, b, swap_counts[:, s, b], True))
    k = len(combos)
    plans = Plan(split=jnp.asarray([[c[0]] * n for c in combos], jnp.int32),
                 resident=jnp.asarray(np.stack([c[3] for c in combos]), jnp.int32),
                 swap=jnp.asarray([[c[4]] * n for c in combos]),
                 codec=jnp.asarray([[c[1]] * n for c in combos], jnp.int32),
                 batch=jnp.asarray([[c[2]] * n for c in combos], jnp.int32))
    per = {key: np.asarray(v, np.float64) for key, v in
           _per_request(inst, plans, max(G - 1, 0)).items()}  # each [K, N]
    fits = per["memory"] <= np.asarray(inst.end_mem, np.float64)[None]
    split = np.asarray([c[0] for c in combos])
    priv = np.asarray(inst.min_end_layers)
    e = np.full((n, L + 1), np.inf)
    c_ = np.full((n, L + 1), np.inf)
    x = np.full((n, L + 1), np.inf)
    bps = np.asarray(mean_bps, np.float64)
    for j in range(k):
        s = split[j]
        ok = fits[j] & (s >= priv)
        up = np.zeros(n) if s == L else 8.0 * per["up_bytes"][j] / bps
        e[:, s] = np.where(ok, np.minimum(e[:, s], per["end_s"][j]), e[:, s])
        c_[:, s] = np.where(ok, np.minimum(c_[:, s], per["cloud_s"][j]), c_[:, s])
        x[:, s] = np.where(ok, np.minimum(x[:, s], up), x[:, s])
    return {"end_s": e, "cloud_s": c_, "uplink_s": x}


def throughput_bound(inst: Instance, mean_bps: np.ndarray) -> dict:
    """The LP bound: ``{"requests_per_s", "binding": [resources at their limit],
    "split_mix": [N, S] requests/s per device and split at the optimum}``."""
    d = cheapest_demands(inst, np.asarray(mean_bps, np.float64))
    e, c, x = d["end_s"], d["cloud_s"], d["uplink_s"]
    n, S = e.shape
    ok = np.isfinite(e) & np.isfinite(c) & np.isfinite(x)
    idx = np.argwhere(ok)  # variables r[i, s] for the allowed pairs
    m = len(idx)
    if m == 0:
        return {"requests_per_s": 0.0, "binding": ["no allowed split"], "split_mix": None}
    rows, names = [], []
    for i in range(n):
        for arr, kind in ((e, "end"), (x, "uplink")):
            rows.append(np.where(idx[:, 0] == i, arr[idx[:, 0], idx[:, 1]], 0.0))
            names.append(f"{kind}{i}")
    rows.append(c[idx[:, 0], idx[:, 1]])
    names.append("cloud")
    a_ub = np.asarray(rows)
    res = linprog(-np.ones(m), A_ub=a_ub, b_ub=np.ones(len(rows)), bounds=[(0, None)] * m,
                  method="highs")
    if res.status != 0:
        raise RuntimeError(f"throughput bound LP failed: {res.message}")
    lam = float(res.x.sum())
    slack = a_ub @ res.x
    mix = np.zeros((n, S))
    for j, (i, s) in enumerate(idx):
        mix[i, s] = res.x[j]
    binding = sorted({names[k].rstrip("0123456789") for k in np.flatnonzero(slack > 1 - 1e-6)})
    return {"requests_per_s": lam, "binding": binding, "split_mix": np.round(mix, 4).tolist()}
