"""Scheduler report extras: routing statistics measured through a trained model, a
re-planning trace under bandwidth jitter and a drop, and the report's plot.

Shape legend: M MoE layers, E experts, N end devices.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from ec2moe_jax.scheduler import Instance
from ec2moe_jax.scheduler.plan import describe
from ec2moe_jax.scheduler.replan import Observation, make_replanner


def measured_frequencies(workdir: str, batches: int = 8, batch_size: int = 16,
                         seq_len: int = 128, seed: int = 1234) -> tuple[np.ndarray, dict, object]:
    """([M, E] routing counts of the MoE layers, provenance, the model's ModelConfig)
    measured by running the trained model in ``workdir`` over ``batches`` training batches
    (measured, not synthetic)."""
    from ec2moe_jax.data import prepare_splits, train_batch
    from ec2moe_jax.models import routing_stats
    from ec2moe_jax.training.loop import load_params

    setup, params = load_params(workdir)
    train = prepare_splits(setup.cfg.data).train
    stats_fn = jax.jit(lambda p, t: routing_stats(setup.model, p, t))
    total = None
    for step in range(batches):
        tokens = jnp.asarray(train_batch(train, step, batch_size=batch_size, seq_len=seq_len,
                                         seed=seed)["inputs"])
        s = stats_fn(params, tokens)
        total = s if total is None else total + s
    counts = np.asarray(total.counts, np.float64)
    counts = counts[counts.sum(-1) > 0]  # dense layers route nothing
    freq = counts / counts.sum(-1, keepdims=True)
    top = -np.sort(-freq, -1)
    return counts, {
        "source": f"measured through the trained model in {workdir} "
                  f"({setup.cfg.name}, {batches} training batches x {batch_size} x {seq_len} "
                  "tokens, ec2moe_jax.models.routing_stats)",
        "top1_share_per_layer": np.round(top[:, 0], 4).tolist(),
        "top_quarter_share_per_layer": np.round(
            top[:, :max(1, top.shape[1] // 4)].sum(-1), 4).tolist(),
    }, setup.cfg.model


def replan_trace(inst: Instance, drop_at: int = 10, steps: int = 20, jitter: float = 0.03,
                 drop: float = 0.01, hysteresis: float = 0.1) -> dict:
    """Runs the jitted re-planner over a bandwidth trace: +-``jitter`` around the
    instance's bandwidths (inside the hysteresis band), then a lasting drop to ``drop`` x
    from step ``drop_at``, with the same jitter. Returns the per-step plan summary."""
    rp = make_replanner(inst, hysteresis=hysteresis)
    update = jax.jit(rp.update)
    state = rp.init()
    moe = np.asarray(inst.is_moe) > 0
    counts = jnp.asarray(np.asarray(inst.freq)[moe] * 1e4, jnp.float32)
    rows = []
    for t in range(steps):
        scale = (drop if t >= drop_at else 1.0) * (1 + jitter * (-1) ** t)
        obs = Observation(counts, inst.link_bps * scale, inst.rtt, inst.rate)
        before = int(state.switches)
        plan, state = update(obs, state)
        d = describe(inst.replace(link_bps=obs.link_bps), plan)
        rows.append({"step": t, "bandwidth_mbps": float(obs.link_bps[0]) / 1e6,
                     "objective": float(state.objective),
                     "switched": int(state.switches) > before,
                     "splits": sorted(set(d["split"])), "kinds": sorted(set(d["kind"])),
                     "codec_index": sorted(set(np.asarray(plan.codec).tolist()))})
    return {"hysteresis": hysteresis, "jitter": jitter, "drop_factor": drop,
            "drop_at_step": drop_at, "switch_steps": [r["step"] for r in rows if r["switched"]],
            "steps": rows}


def plot(record: dict, path: str, devices: int = 32) -> str | None:
    """Objective vs bandwidth (single-pass, ``devices`` ends) and the re-planning trace;
    ``None`` when matplotlib is not installed (an optional dependency)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=120)
    rows = [r for r in record["workloads"]["single_pass"]["rows"] if r["devices"] == devices]
    bw = [r["bandwidth_mbps"] for r in rows]
    for key, style in (("ec2moe", "o-"), ("cloud_only", "s--"), ("end_only_swap", "^--"),
                       ("best_split", "d--")):
        ys = [r[key] * 1e3 if r[key] is not None else np.nan for r in rows]
        ax.plot(bw, ys, style, label=key.replace("_", " "))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link bandwidth (Mbps)")
    ax.set_ylabel("mean request latency (ms, predicted)")
    ax.set_title(f"single-pass, {devices} end devices (simulated)")
    ax.text(0.02, 0.02, "missing points: unstable (cloud or link overloaded)",
            transform=ax.transAxes, fontsize=7, color="grey")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    trace = record["replan_trace"]["steps"]
    t = [r["step"] for r in trace]
    bx.plot(t, [r["bandwidth_mbps"] for r in trace], "k.-", label="bandwidth (Mbps)")
    bx.set_yscale("log")
    bx.set_xlabel("re-planning step")
    bx.set_ylabel("bandwidth (Mbps)")
    for r in trace:
        if r["switched"]:
            bx.axvline(r["step"], color="r", ls="--", lw=1)
    bx.set_title("re-planning trace (red: plan change)")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
