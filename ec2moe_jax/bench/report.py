"""The evaluation report: the regime grid, three sweeps for plots, measured quality, the
simulator's validation, the paper-shaped tables and ``results/bench.json`` (*ours*).

Entry point: ``ec2moe bench``. See :mod:`~ec2moe_jax.bench.evaluation` for the
method of each figure.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np

from ec2moe_jax.bench import evaluation as ev
from ec2moe_jax.bench import sim, strategies
from ec2moe_jax.bench.traces import Drop
from ec2moe_jax.files import write_json_atomic, write_text_atomic

COMMAND = "ec2moe bench"
LOAD_SWEEP = ev.Regime("private-score-512", "t4", 64, 20.0)
LOAD_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3)
BANDWIDTH_SWEEP = ev.Regime("generate-128+32", "t4", 8, 20.0)
SWEEP_MBPS = (2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
TIMELINE = ev.Regime("private-score-512", "t4", 8, 20.0)
TIMELINE_DROP = (0.35, 0.65, 0.05)  # from 35% to 65% of the run, every link at 5%


def load_sweep(ctx: ev.Context, regime: ev.Regime = LOAD_SWEEP,
               fractions=LOAD_FRACTIONS, names=strategies.STRATEGIES) -> dict:
    """Achieved vs offered throughput: open-loop Poisson load at ``fractions`` of the
    throughput bound, each strategy planned for that load. Cloud-only is simulated even in
    a private workload, labelled as violating the constraint."""
    n = regime.devices
    live, _, _ = ev.fleet(n, ctx.seed)
    ub = ev.throughput_bound(ev._instance(ctx, regime, live, 1.0),
                             np.full(n, regime.mbps * 1e6))["requests_per_s"]
    names = [m for m in names if m != "masked-top-k"]
    out = {m: [] for m in names}
    offered = []
    for k, f in enumerate(fractions):
        lam = f * ub
        h = ev._horizon(lam, 400, 20.0, 300.0)
        s = ev.setting(ctx, regime, lam / n, h, 500 + k)
        arr = sim.poisson_arrivals([lam / n] * n, h, 500 + k)
        offered.append(lam)
        for m in names:
            r = ev.run_strategy(ctx, m, s, arr, h, window=(0.3 * h, h))
            out[m].append({"offered_rps": lam, "throughput_rps": r.summary["throughput_rps"],
                           "latency_p95_s": r.summary["latency_p95_s"]})
    return {"regime": regime.label, "bound_rps": ub, "offered_rps": offered,
            "strategies": out,
            "note": "cloud-only sends raw tokens: shown for reference, not allowed here"
            if regime.tokens[2] else ""}


def bandwidth_sweep(ctx: ev.Context, regime: ev.Regime = BANDWIDTH_SWEEP, mbps=SWEEP_MBPS,
                    names=strategies.STRATEGIES) -> dict:
    """p95 latency vs mean bandwidth at one offered load: half of cloud-only's measured
    saturation throughput at the highest bandwidth (the same absolute load everywhere)."""
    n = regime.devices
    top = dataclasses.replace(regime, mbps=max(mbps))
    probe = ev.setting(ctx, top, 1.0, 60.0, 900)
    cap = ev.run_strategy(ctx, "cloud-only", probe, max(16, 64 // n), 60.0,
                          window=(18.0, 60.0)).summary["throughput_rps"]
    lam = 0.5 * cap
    names = [m for m in names if m != "masked-top-k"]
    out = {m: [] for m in names}
    for k, b in enumerate(mbps):
        rg = dataclasses.replace(regime, mbps=b)
        h = ev._horizon(lam, 200, 30.0, 600.0)
        s = ev.setting(ctx, rg, lam / n, h, 700 + k, trace_mbps=b)
        arr = sim.poisson_arrivals([lam / n] * n, h, 700 + k)
        for m in names:
            r = ev.run_strategy(ctx, m, s, arr, h)
            out[m].append({"mbps": b, "latency_p95_s": r.summary["latency_p95_s"],
                           "latency_mean_s": r.summary["latency_mean_s"]})
    return {"regime": regime.label, "offered_rps": lam, "mbps": list(mbps), "strategies": out}


def timeline(ctx: ev.Context, regime: ev.Regime = TIMELINE, horizon: float = 120.0,
             bins: int = 40) -> dict:
    """EC2MoE (re-planning) vs its static plan through a common bandwidth drop, at half the
    static plan's saturation throughput: per-bin mean latency by arrival time, the plan kind
    share of EC2MoE's requests, the bandwidth of device 0."""
    n = regime.devices
    a, b, factor = TIMELINE_DROP

    def drops(i, h):
        return (Drop(a * h, (b - a) * h, factor),)

    probe = ev.setting(ctx, regime, 1.0, horizon, 42, drops=drops)
    sat = ev.run_strategy(ctx, "static", probe, max(16, 64 // n), horizon,
                          window=(0.0, a * horizon)).summary["throughput_rps"]
    lam = 0.5 * sat
    s = ev.setting(ctx, regime, lam / n, horizon, 43, drops=drops)
    arr = sim.poisson_arrivals([lam / n] * n, horizon, 43)
    edges = np.linspace(0, horizon, bins + 1)
    out = {}
    for m in (strategies.EC2MOE, "static"):
        ctrl = strategies.controller(m, s, ctx.counts, 2.0)
        simulator = sim.Simulator(ctrl.timing, ctrl, s.up, s.down, s.rtt, 0)
        res = simulator.run(arr, horizon)
        arrival = np.array([r.arrival for r in res.requests])
        lat = np.array([r.done - r.arrival for r in res.requests])
        idx = np.clip(np.digitize(arrival, edges) - 1, 0, bins - 1)
        mean = [float(lat[idx == k].mean()) if np.any(idx == k) else None for k in range(bins)]
        kinds = []
        for k in range(bins):
            sel = [r for r, i in zip(res.requests, idx, strict=True) if i == k]
            split = [int(np.asarray(ctrl.plans[r.version].split)[r.device]) for r in sel]
            L = ctx.costs.num_layers
            kinds.append({"end-only": sum(x == L for x in split) / max(len(sel), 1),
                          "split": sum(0 < x < L for x in split) / max(len(sel), 1)})
        out[m] = {"mean_latency_s": mean, "kinds": kinds,
                  "switch_times_s": [t for t, _ in res.switches],
                  "summary": res.summary()}
    tr = s.up[0]
    centers = (edges[:-1] + edges[1:]) / 2
    return {"regime": regime.label, "offered_rps": lam, "horizon_s": horizon,
            "drop": {"start_s": a * horizon, "stop_s": b * horizon, "factor": factor},
            "bin_centers_s": centers.tolist(),
            "bandwidth_mbps_device0": [tr.mean_bps(x0, x1) / 1e6
                                       for x0, x1 in zip(edges[:-1], edges[1:], strict=True)],
            "strategies": out}


# -- quality --------------------------------------------------------------------------
def quality_keys(ctx: ev.Context, rows: list[dict], small_cfg) -> dict:
    """(regime label, strategy) -> [(QualityKey, completed requests)] from the plans each
    moderate-load request ran under."""
    from ec2moe_jax.bench.quality import map_plan
    from ec2moe_jax.config import load_config

    base = load_config("base").model
    names = [c.name for c in ctx.codecs]
    out = {}
    for row in rows:
        for m, (plans, usage) in row["_plans"].items():
            gate = "group" if m in strategies.GROUP_GATE else "masked"
            weights: dict = {}
            for (v, d), k in usage.items():
                p = plans[v]
                key = map_plan(int(np.asarray(p.split)[d]),
                               [int(x) for x in np.asarray(p.resident)[d]],
                               bool(np.asarray(p.swap)[d]), names[int(np.asarray(p.codec)[d])],
                               gate=gate, base_cfg=base, small_cfg=small_cfg,
                               experts="bf16" if m == strategies.LOSSLESS else ctx.end_experts,
                               by_slots=ctx.quality is not None and m != strategies.LOSSLESS)
                weights[key] = weights.get(key, 0) + k
            out[(row["label"], m)] = list(weights.items())
    return out


def attach_quality(rows: list[dict], keys: dict, measured: dict) -> None:
    """Adds ``bits_per_char`` (request-weighted over the plans used) to every strategy."""
    for row in rows:
        for m, st in row["strategies"].items():
            if not st.get("allowed"):
                continue
            pairs = keys.get((row["label"], m), [])
            tot = sum(k for _, k in pairs)
            st["bits_per_char"] = (sum(measured[q]["bits_per_char"] * k for q, k in pairs)
                                   / tot if tot else None)
            st["quality_keys"] = [q.label() for q, _ in pairs]


# -- tables ---------------------------------------------------------------------------
def _stats(xs):
    """Median, min, max over regimes; ``inf`` (a baseline that completed nothing) counts
    as the largest value, ``None`` (no latency: nothing completed) is left out."""
    xs = [x for x in xs if x is not None and not np.isnan(x)]
    if not xs:
        return None
    return {"median": float(np.median(xs)), "min": float(np.min(xs)),
            "max": float(np.max(xs)), "n": len(xs)}


def headline(rows: list[dict]) -> dict:
    """EC2MoE vs each baseline and the best baseline over all regimes, per workload, and
    the ablations relative to EC2MoE."""
    comps = [ev.compare(r) for r in rows]
    out = {"vs": {}, "per_workload": {}, "ablations": {}, "regimes": len(rows)}
    for b in strategies.BASELINES:
        c = [x["per_baseline"][b] for x in comps if b in x["per_baseline"]]
        out["vs"][b] = {"throughput_ratio": _stats([x["throughput_ratio"] for x in c]),
                        "latency_reduction": _stats([x["latency_reduction"] for x in c]),
                        "regimes": len(c)}
    best = [x["best_baseline"] for x in comps]
    out["vs"]["best baseline"] = {
        "throughput_ratio": _stats([x["throughput_ratio"] for x in best]),
        "latency_reduction": _stats([x["latency_reduction"] for x in best]),
        "regimes": len(best)}
    for w in ev.WORKLOADS:
        sel = [(r, c["best_baseline"]) for r, c in zip(rows, comps, strict=True)
               if r["regime"]["workload"] == w]
        if not sel:
            continue
        out["per_workload"][w] = {
            "throughput_ratio": _stats([c["throughput_ratio"] for _, c in sel]),
            "latency_reduction": _stats([c["latency_reduction"] for _, c in sel]),
            "fraction_of_bound": _stats([c["fraction_of_bound"] for _, c in sel]),
            "regimes": len(sel),
            "cloud_only_best_or_tied": sum(
                r["strategies"]["cloud-only"].get("allowed", False)
                and c["throughput_baseline"] == "cloud-only" and c["throughput_ratio"] < 1.05
                and c["latency_reduction"] < 0.05 for r, c in sel),
            "paper_throughput": sum(c["paper_throughput"] for _, c in sel),
            "paper_latency": sum(c["paper_latency"] for _, c in sel),
            "ec2moe_plan_kinds": _mean_kinds([r["strategies"][strategies.EC2MOE]["plan_kinds"]
                                              for r, _ in sel])}
    for a in (strategies.LOSSLESS, *strategies.ABLATIONS):
        thr = [r["strategies"][a]["throughput_rps"]
               / max(r["strategies"][strategies.EC2MOE]["throughput_rps"], 1e-12) for r in rows]
        lat = [_ratio(r["strategies"][a]["latency_mean_s"],
                      r["strategies"][strategies.EC2MOE]["latency_mean_s"]) for r in rows]
        out["ablations"][a] = {"throughput_vs_ec2moe": _stats(thr),
                               "latency_vs_ec2moe": _stats(lat)}
    out["quality"] = {m: _stats([r["strategies"][m].get("bits_per_char") for r in rows
                                 if r["strategies"][m].get("allowed")])
                      for m in strategies.STRATEGIES}
    lossless = {}
    for w in ev.WORKLOADS:
        sel = [r for r in rows if r["regime"]["workload"] == w]
        ratios = []
        for r in sel:
            best = max(r["strategies"][b]["throughput_rps"] for b in strategies.BASELINES
                       if r["strategies"][b].get("allowed"))
            got = r["strategies"][strategies.LOSSLESS]["throughput_rps"]
            ratios.append(got / best if best > 0 else math.inf)
        if sel:
            lossless[w] = _stats(ratios)
    out["lossless_vs_best_baseline"] = lossless
    paper = [(r["label"], c["best_baseline"]) for r, c in zip(rows, comps, strict=True)
             if c["best_baseline"]["paper_throughput"] or c["best_baseline"]["paper_latency"]]
    out["paper_regimes"] = [{"regime": lbl, "throughput_ratio": c["throughput_ratio"],
                             "latency_reduction": c["latency_reduction"],
                             "baseline": c["throughput_baseline"]} for lbl, c in paper]
    return out


def _x(v):
    return "n/a" if v is None else f"{v:.2f}x" if math.isfinite(v) else "inf"


def _pct(v):
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:+.0f}%"


def _ratio(a, b):
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _mean_kinds(kinds: list[dict]) -> dict:
    keys = sorted({k for d in kinds for k in d})
    return {k: round(float(np.mean([d.get(k, 0.0) for d in kinds])), 3) for k in keys}


def _fmt(s, pct=False):
    if s is None:
        return "n/a"
    def f(x):
        if not math.isfinite(x):
            return "inf" if x > 0 else "-inf"
        return f"{100 * x:+.0f}%" if pct else f"{x:.2f}x"

    return f"{f(s['median'])} [{f(s['min'])}, {f(s['max'])}]"


def markdown(record: dict) -> str:
    """The README tables (headline, per workload, ablations, quality) and, in full, one
    row per regime."""
    h = record["headline"]
    lines = [f"Simulated ({record['method_short']}); quality measured. Median [min, max] over "
             f"{h['regimes']} regimes.", "",
             "| EC2MoE vs | throughput ratio | latency reduction (mean, moderate load) |"
             " regimes |", "|---|---|---|---|"]
    for b, v in h["vs"].items():
        lines.append(f"| {b} | {_fmt(v['throughput_ratio'])} | "
                     f"{_fmt(v['latency_reduction'], True)} | {v['regimes']} |")
    lines += ["", "| workload | throughput ratio vs best baseline | latency reduction | "
              "EC2MoE / bound | cloud-only best (tied) | paper 2.2x / 53% reached | "
              "EC2MoE plans (share of requests) |", "|---|---|---|---|---|---|---|"]
    for w, v in h["per_workload"].items():
        kinds = ", ".join(f"{k} {x:.0%}" for k, x in v["ec2moe_plan_kinds"].items())
        fb = v["fraction_of_bound"]
        lines.append(f"| {w} | {_fmt(v['throughput_ratio'])} | "
                     f"{_fmt(v['latency_reduction'], True)} | "
                     f"{fb['median']:.0%} [{fb['min']:.0%}, {fb['max']:.0%}] | "
                     f"{v['cloud_only_best_or_tied']}/{v['regimes']} | "
                     f"{v['paper_throughput']} / {v['paper_latency']} of {v['regimes']} | "
                     f"{kinds} |")
    lines += ["", "| variant or ablation | throughput / EC2MoE's | mean latency / EC2MoE's | "
              "bits/char |",
              "|---|---|---|---|"]
    for a, v in h["ablations"].items():  # the lossless variant first, then the ablations
        q = h["quality"].get(a)
        lines.append(f"| {a} | {_fmt(v['throughput_vs_ec2moe'])} | "
                     f"{_fmt(v['latency_vs_ec2moe'])} | "
                     f"{q['median']:.3f} [{q['min']:.3f}, {q['max']:.3f}] |" if q else
                     f"| {a} | {_fmt(v['throughput_vs_ec2moe'])} | "
                     f"{_fmt(v['latency_vs_ec2moe'])} | n/a |")
    if h.get("lossless_vs_best_baseline"):
        lines += ["", "| workload | ec2moe-lossless (drops no expert) throughput vs best "
                  "baseline |", "|---|---|"]
        for w, v in h["lossless_vs_best_baseline"].items():
            lines.append(f"| {w} | {_fmt(v)} |")
    lines += ["", "| strategy | bits/char on held-out text (median [min, max] over regimes) |",
              "|---|---|"]
    full = record.get("quality", {}).get("full_model_bits_per_char")
    for m, q in h["quality"].items():
        lines.append(f"| {m} | " + (f"{q['median']:.3f} [{q['min']:.3f}, {q['max']:.3f}]"
                                    if q else "n/a") + " |")
    if full is not None:
        lines.append(f"| (unsplit small model) | {full:.3f} |")
    return "\n".join(lines) + "\n"


def regime_table(record: dict) -> str:
    """One row per regime (for results/bench.md)."""
    lines = ["| regime | bound (req/s) | EC2MoE req/s (of bound) | best baseline | "
             "throughput ratio | latency reduction | EC2MoE plans | bits/char EC2MoE / "
             "best baseline |", "|---|---|---|---|---|---|---|---|"]
    for r in record["regimes"]:
        c = r["comparison"]["best_baseline"]
        ec = r["strategies"][strategies.EC2MOE]
        bb = r["strategies"][c["throughput_baseline"]]
        kinds = ", ".join(f"{k} {x:.0%}" for k, x in ec["plan_kinds"].items())
        q = (f"{ec['bits_per_char']:.3f} / {bb['bits_per_char']:.3f}"
             if ec.get("bits_per_char") is not None and bb.get("bits_per_char") is not None
             else "n/a")
        lines.append(f"| {r['label']} | {r['bound_rps']:.3g} | {ec['throughput_rps']:.3g} "
                     f"({c['fraction_of_bound']:.0%}) | {c['throughput_baseline']} | "
                     f"{_x(c['throughput_ratio'])} | {_pct(c['latency_reduction'])} | "
                     f"{kinds} | {q} |")
    return "\n".join(lines) + "\n"


# -- plots ----------------------------------------------------------------------------
# (color, marker, linestyle) per strategy: solid for EC2MoE, dotted for its ablations,
# dashed for the baselines, so a line stays identifiable where two coincide.
STYLE = {"ec2moe": ("C0", "o", "-"), "ec2moe-lossless": ("C9", "P", ":"),
         "no-hw-selection": ("C4", "v", ":"), "no-codec": ("C5", "<", ":"),
         "static": ("C6", ">", ":"), "cloud-only": ("C1", "s", "--"),
         "end-only": ("C2", "^", "--"), "best-split": ("C3", "d", "--")}


def _line(ax, m: str, xs, ys, label: str, ms: float = 4.0):
    """One strategy's line: EC2MoE solid, filled and on top (zorder); the others slightly
    transparent with larger hollow markers, so EC2MoE's points show inside a baseline's
    where the two coincide (it often picks the same plan)."""
    c, marker, ls = STYLE.get(m, ("k", "x", "-"))
    if m == "ec2moe":
        return ax.plot(xs, ys, color=c, marker=marker, ls=ls, lw=2.2, ms=ms + 1, zorder=5,
                       label=label)
    return ax.plot(xs, ys, color=c, marker=marker, ls=ls, lw=1.3, ms=ms + 3, alpha=0.75,
                   mfc="none", mew=1.2, zorder=3, label=label)


def _same_as_ec2moe(strategies: dict, key: str) -> list[str]:
    """Names of the strategies whose ``key`` series equals EC2MoE's at every point."""
    ref = strategies.get("ec2moe")
    if ref is None:
        return []
    ys = np.array([np.nan if p[key] is None else p[key] for p in ref], float)
    same = []
    for m, pts in strategies.items():
        other = np.array([np.nan if p[key] is None else p[key] for p in pts], float)
        if m != "ec2moe" and other.shape == ys.shape and np.allclose(other, ys,
                                                                    equal_nan=True):
            same.append(m)
    return same


def _xlabel(ax, text: str, strategies: dict, key: str) -> None:
    """``text`` as the x label, plus a line naming the strategies EC2MoE coincides with (its
    line then runs over theirs; said in words, since no line may hide another silently)."""
    same = _same_as_ec2moe(strategies, key)
    if same:
        text += f"\n(ec2moe's points coincide with {', '.join(same)})"
    ax.set_xlabel(text, fontsize=9)


def plot(record: dict, path: str) -> str | None:
    """The evaluation's three panels (PNG): throughput against offered load, p95 latency
    against bandwidth, and mean latency through a bandwidth drop (all simulated).

    Args:
      record: a record of :func:`run` (or the ``results/bench.json`` it wrote), with
        ``load_sweep``, ``bandwidth_sweep`` and ``timeline``.
      path: PNG file to write; its folder is created.

    Returns:
      ``path``, or None where matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # Constrained layout makes room for the legends below the axes, where they hide no line.
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4), dpi=110, layout="constrained")
    ls = record["load_sweep"]
    ax = axes[0]
    for m, pts in ls["strategies"].items():
        label = m + (" (not allowed)" if m == "cloud-only" and ls["note"] else "")
        _line(ax, m, [p["offered_rps"] for p in pts], [p["throughput_rps"] for p in pts], label)
    ax.axhline(ls["bound_rps"], color="k", lw=0.9, ls=(0, (5, 3)), zorder=1,
               label="bound (any plan)")
    _xlabel(ax, "offered load (requests/s)", ls["strategies"], "throughput_rps")
    ax.set_ylabel("achieved throughput (requests/s)")
    ax.set_title(f"throughput vs load: {ls['regime']}\n(simulated)", fontsize=9)
    ax.grid(alpha=0.3)
    bs = record["bandwidth_sweep"]
    ax = axes[1]
    for m, pts in bs["strategies"].items():
        ys = [p["latency_p95_s"] if p["latency_p95_s"] is not None else np.nan for p in pts]
        _line(ax, m, [p["mbps"] for p in pts], ys, m)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _xlabel(ax, "mean uplink bandwidth of the LTE-like trace (Mbit/s)", bs["strategies"],
            "latency_p95_s")
    ax.set_ylabel("p95 request latency (s)")
    ax.set_title(f"p95 latency vs bandwidth: {bs['regime'].rsplit('/', 1)[0]}\n"
                 f"at {bs['offered_rps']:.3g} req/s (simulated)", fontsize=9)
    ax.grid(alpha=0.3)
    tl = record["timeline"]
    ax = axes[2]
    x = tl["bin_centers_s"]
    bx = ax.twinx()
    bx.plot(x, tl["bandwidth_mbps_device0"], "k-", lw=0.8, alpha=0.5, zorder=1,
            label="bandwidth of device 0 (timeline, right axis)")
    bx.set_ylabel("bandwidth of device 0 (Mbit/s)")
    # The latency axis goes in front of the bandwidth twin so its lines are not covered.
    ax.set_zorder(bx.get_zorder() + 1)
    ax.patch.set_visible(False)
    for m in ("static", "ec2moe"):
        ys = [y if y is not None else np.nan for y in tl["strategies"][m]["mean_latency_s"]]
        _line(ax, m, x, ys, m, ms=3)
    for i, t in enumerate(tl["strategies"]["ec2moe"]["switch_times_s"]):
        ax.axvline(t, color="C0", lw=0.6, alpha=0.5,
                   label="EC2MoE re-plans (timeline)" if i == 0 else None)
    ax.axvspan(tl["drop"]["start_s"], tl["drop"]["stop_s"], color="grey", alpha=0.12,
               label="bandwidth drop (timeline)")
    ax.set_yscale("log")
    ax.set_xlabel("time (s)", fontsize=9)
    ax.set_ylabel("mean latency of requests arriving then (s)")
    ax.set_title(f"through a drop to {tl['drop']['factor']:.0%}: {tl['regime']}\n"
                 "(simulated)", fontsize=9)
    # One legend below the axes (where it hides no line): the strategies share one style in
    # every panel, then the bound and the right panel's own marks.
    h0, l0 = axes[0].get_legend_handles_labels()
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = bx.get_legend_handles_labels()
    extra = [(h, lab) for h, lab in zip(h1 + h2, l1 + l2, strict=True) if lab not in STYLE]
    fig.legend(h0 + [h for h, _ in extra], l0 + [lab for _, lab in extra],
               loc="outside lower center", ncol=6, fontsize=8, frameon=False)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# -- the whole run ------------------------------------------------------------------------
def _clean(x):
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, float | np.floating):
        x = float(x)
        # JSON has no infinity: a ratio against a baseline that completed nothing is "inf".
        return x if math.isfinite(x) else None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, np.integer):
        return int(x)
    return x


def run(workdir: str, *, calibration, codec_sweep, regimes=None, quality: bool = True,
        validation: bool = True, gate_steps: int = 0, progress: bool = True, log=print,
        budget: dict | None = None) -> dict:
    """Everything ``ec2moe bench`` writes, as one JSON-ready record; ``calibration`` and
    ``codec_sweep``: the paths of ``ec2moe calibrate``'s and ``ec2moe codec-sweep``'s files;
    ``budget``: the quality budget's keyword arguments of
    :meth:`~ec2moe_jax.bench.evaluation.Context.default` (None: the routing-mass proxy)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    ctx = ev.Context.default(calibration, codec_sweep, **(budget or {}))
    regimes = regimes or ev.regimes()
    rows = []
    for rg in tqdm(regimes, desc="regimes (simulated)", disable=not progress):
        row = ev.run_regime(ctx, rg)
        row["comparison"] = ev.compare(row)
        rows.append(row)
    log(f"regime grid: {time.time() - t0:.0f} s")
    t1 = time.time()
    sweeps = {"load_sweep": load_sweep(ctx), "bandwidth_sweep": bandwidth_sweep(ctx),
              "timeline": timeline(ctx)}
    log(f"sweeps: {time.time() - t1:.0f} s")
    record = {"benchmark": "evaluation", "command": COMMAND}
    qual = {"status": "not run"}
    if quality:
        t1 = time.time()
        qual = _quality(ctx, rows, workdir, gate_steps, progress)
        log(f"quality: {time.time() - t1:.0f} s")
    val = {"status": "not run"}
    if validation:
        t1 = time.time()
        val = _validation(workdir, progress, calibration, codec_sweep)
        log(f"validation: {time.time() - t1:.0f} s")
    cal = ctx.calibration
    record.update({
        "method": (f"simulated: discrete-event simulator (ec2moe_jax.bench.sim) with job "
                   f"times from the cost model calibrated on this CPU ({cal.source}; "
                   f"eta_flops={cal.eta_flops:.3g}, eta_bw={cal.eta_bw:.3g}, "
                   f"{cal.overhead_s * 1e3:.2g} ms per job + {cal.layer_overhead_s * 1e3:.2g}"
                   " ms per layer), device presets scaled by their spec-sheet roofline (no "
                   "GPU was measured: the cloud presets reuse this CPU's efficiencies); "
                   "links: synthetic LTE-like traces (ec2moe_jax.bench.traces) with one drop "
                   "to 10% for 15% of each run per device. Quality: measured (bits/char of "
                   "the knob-matched small-model plan through the real pipeline)."),
        "method_short": "discrete-event simulator, cost model calibrated on this CPU, "
                        "spec-sheet presets, synthetic LTE-like traces",
        "model": "base config (12 layers, d=1024, 32 experts top-2 + shared expert, bf16, "
                 "2.2 GiB), synthetic Zipf(1) routing statistics",
        "fleet": {"classes": {k: {"preset": v[0], "live_memory_gib": v[1],
                                  "background_load": v[2]}
                              for k, v in ev.END_CLASSES.items()},
                  "mix": "Orin Nano and laptop alternating (N=1: one Orin Nano)"},
        "workloads": {k: {"prompt_tokens": v[0], "gen_tokens": v[1], "private": v[2]}
                      for k, v in ev.WORKLOADS.items()},
        "clouds": list(ev.CLOUDS), "devices": list(ev.DEVICES),
        "bandwidth_mbps_to_rtt_s": {str(k): v for k, v in ev.BANDWIDTHS.items()},
        "strategies": {"ec2moe": strategies.EC2MOE, "variant": strategies.LOSSLESS,
                       "ablations": list(strategies.ABLATIONS),
                       "baselines": list(strategies.BASELINES)},
        "regimes": rows, **sweeps, "quality": qual, "validation": val,
        "quality_budget": (
            {"kind": "routing-mass proxy", "min_coverage": 0.9, "codec_budget": ctx.codec_budget,
             "end_experts": ctx.end_experts} if ctx.quality is None else
            {"kind": "measured", "source": ctx.quality.source,
             "fractions": list(ctx.quality.fractions), "loss": list(ctx.quality.loss),
             "quality_budget_per_end_layer": ctx.quality_budget,
             "codec_budget": ctx.codec_budget, "end_experts": ctx.end_experts,
             "note": "each end MoE layer of a plan is charged the loss measured on the small "
                     "model when its whole end held that share of its experts (the "
                     "pessimistic step function of ResidencyQuality); the lossless variant "
                     "keeps every expert, stored as the model's own weights (coverage 1)"}),
    })
    record["headline"] = headline(rows)
    record["wall_seconds"] = round(time.time() - t0, 1)
    return record


def _quality(ctx, rows, workdir, gate_steps, progress) -> dict:
    from ec2moe_jax.bench.quality import evaluate_keys, full_model_key
    from ec2moe_jax.config import load_config

    small = load_config("small").model
    try:
        keys = quality_keys(ctx, rows, small)
        distinct = {q for pairs in keys.values() for q, _ in pairs} | {full_model_key(small)}
        measured = evaluate_keys(workdir, sorted(distinct, key=lambda q: q.label()),
                                 gate_steps=gate_steps, progress=progress)
    except (FileNotFoundError, ValueError) as e:
        return {"status": f"not measured: {e}"}
    attach_quality(rows, keys, measured)
    return {"status": "measured",
            "method": f"bits/char of 64 held-out windows x 128 bytes of the trained model in "
                      f"{workdir}, each strategy's base-model plan mapped to the small model "
                      "(ec2moe_jax.bench.quality.map_plan) and run through the real pipeline; "
                      + ("group gates initialised by least-squares distillation of the router "
                         "on real activations, not trained" if gate_steps == 0 else
                         f"group gates trained {gate_steps} steps (LM frozen) where none was "
                         "saved") + "; per regime and strategy weighted by the requests each "
                      "plan served",
            "full_model_bits_per_char": measured[full_model_key(small)]["bits_per_char"],
            "keys": {q.label(): {k: v for k, v in r.items() if k != "plan"}
                     for q, r in measured.items()}}


def _validation(workdir, progress, calibration, codec_sweep) -> dict:
    from ec2moe_jax.bench.sim_validation import validate

    try:
        return validate(workdir, progress=progress, calibration=calibration,
                        codec_sweep=codec_sweep)
    except (FileNotFoundError, ValueError) as e:
        return {"status": f"not run: {e}"}


def write(record: dict, json_path: str, md_path: str, png_path: str) -> dict:
    """Writes the JSON (atomically), the markdown tables and the plot from a record of
    :func:`run`; returns the JSON-ready record."""
    try:
        record["plot"] = plot(record, png_path) or "not written: matplotlib not installed"
    except Exception as e:  # a plotting failure must not lose a quarter hour of results
        record["plot"] = f"not written: {type(e).__name__}: {e}"
    tables = markdown(record)
    write_text_atomic(md_path, "# Evaluation tables (generated by `" + COMMAND + "`)\n\n"
                      + tables + "\n## Every regime\n\n" + regime_table(record))
    record["tables_markdown"] = tables
    record = _clean(record)
    write_json_atomic(json_path, record, indent=1)
    return record
