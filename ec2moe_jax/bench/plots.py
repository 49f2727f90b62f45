"""PNG plots of results: the training curve and the end-cloud demo.

Each function takes the result dict its command writes as JSON (so a committed result can be
re-plotted without re-running it) and a PNG path, and returns the path written.
"""

from __future__ import annotations

import os

import numpy as np


def plot_training_curve(result: dict, path: str) -> str:
    """Validation bits/char against wall-clock minutes, with the final test figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    minutes = [c["wall_seconds"] / 60 for c in curve]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(minutes, [c["val_bits_per_char"] for c in curve], "o-",
            label="validation (periodic, disjoint windows)")
    ax.axhline(2.0, color="grey", ls="--", lw=1, label="2.0 bits/char target")
    if "bits_per_char_test" in result:
        ax.plot([minutes[-1]], [result["bits_per_char_test"]], "r*", ms=12,
                label=f"test {result['bits_per_char_test']:.3f} (final, sliding window)")
    if "bits_per_char_test_nonoverlapping" in result:
        v = result["bits_per_char_test_nonoverlapping"]
        ax.plot([minutes[-1]], [v], "ks", ms=7, label=f"test {v:.3f} (final, disjoint)")
    ax.set_xlabel("training wall-clock minutes (measured, " + result.get("devices", "") + ")")
    ax.set_ylabel("bits per character")
    ax.set_title(f"{result.get('config', '')} MoE LM on held-out Shakespeare")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plan_words(plan: dict) -> str:
    """Split, resident experts and codec of a demo plan (``PipelinePlan.to_json()``)."""
    split, resident = int(plan["split"]), list(plan["resident"])
    layers = len(resident)
    if split == 0:
        return "cloud-only (all layers on the cloud)"
    where = (f"end-only (all {layers} layers on the end)" if split == layers
             else f"split after layer {split} of {layers}")
    kept = "/".join(str(n) for n in resident[:split])
    swap = ", others swapped in" if plan.get("swap") else ", others dropped"
    # Nothing crosses the link when every layer runs on the end, so the codec is moot there.
    codec = "no link traffic" if split == layers else f"codec {plan.get('codec', 'none')}"
    return f"{where}; resident experts per end layer {kept}{swap}; {codec}"


def plot_demo(result: dict, path: str) -> str:
    """Speed beside quality for each plan of the end-cloud demo (PNG, two panels).

    Left: measured generation latency (p50), time to first token (mean) and scoring latency
    (p50) per plan, in seconds, with the scheduler's predicted generation latency as a marker.
    Right: bits/char of each plan on the scored held-out windows, with the full model's
    (the cloud-only row, which runs every expert) as a reference line. A plan that is fast
    because it dropped experts shows up on the right. The title names EC2MoE's chosen plan.

    Args:
      result: the dict ``ec2moe demo-pipeline`` writes (``results/pipeline_demo.json``):
        ``rows`` with ``name``, ``plan``, ``generate``, ``score``, ``bits_per_char`` and
        ``predicted_generate_s``; ``link`` and ``workload``. A row with ``same_as`` reuses
        another plan's measurement.
      path: PNG file to write; its folder is created.

    Returns:
      ``path``.

    Raises:
      KeyError: ``result`` lacks one of the fields above.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    names = [r["name"] + (f"\n(= {r['same_as']})" if r.get("same_as") else "") for r in rows]
    x = np.arange(len(rows))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12.5, 4.8), dpi=120,
                                 gridspec_kw={"width_ratios": [1.7, 1]})
    series = (("generation latency p50", [r["generate"]["latency_p50_s"] for r in rows]),
              ("time to first token (mean)", [r["generate"]["ttft_mean_s"] for r in rows]),
              ("scoring latency p50", [r["score"]["latency_p50_s"] for r in rows]))
    width = 0.8 / len(series)
    for j, (label, vals) in enumerate(series):
        ax.bar(x + (j - 1) * width, vals, width, label=label, color=f"C{j}")
    predicted = [r.get("predicted_generate_s") for r in rows]
    if any(p is not None for p in predicted):
        ax.plot(x - width, [np.nan if p is None else p for p in predicted], "kD", ms=5,
                label="predicted generation latency (cost model, one request alone)")
    ax.set_xticks(x, names, fontsize=8)
    w = result.get("workload", {})
    # The demo's requests take turns on the same devices, so a measured latency holds the
    # other requests' steps while the prediction is for one request alone.
    ax.set_xlabel(f"plan ({w.get('requests', '?')} requests share the devices: each measured "
                  "latency includes the others' steps)", fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title("speed: measured compute (this CPU) + emulated link", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, axis="y")

    bits = [r["bits_per_char"] for r in rows]
    colors = ["C0" if r["name"] == "ec2moe" else "0.6" for r in rows]
    bars = bx.bar(x, bits, 0.6, color=colors)
    bx.bar_label(bars, [f"{b:.3f}" for b in bits], fontsize=7, padding=2)
    full = next((r["bits_per_char"] for r in rows if r["name"] == "cloud-only"), None)
    if full is not None:
        bx.axhline(full, color="k", ls="--", lw=1, label=f"full model {full:.3f} (cloud-only)")
        bx.legend(fontsize=7, loc="upper left")
    bx.set_xticks(x, names, fontsize=8)
    bx.set_ylim(0, max(bits) * 1.25)
    for axis in (ax, bx):
        for label, r in zip(axis.get_xticklabels(), rows, strict=True):
            if r["name"] == "ec2moe":
                label.set_fontweight("bold")
    bx.set_ylabel("bits per character (lower is better)")
    bx.set_title(f"quality: {w.get('scored_windows', '?')} held-out windows of "
                 f"{w.get('scored_tokens_per_window', '?')} bytes", fontsize=10)
    bx.grid(alpha=0.3, axis="y")

    chosen = next((r for r in rows if r["name"] == "ec2moe"), None)
    link = result.get("link", {})
    head = ("EC2MoE chose: " + _plan_words(chosen["plan"]) if chosen is not None
            else "EC2MoE vs baselines")
    fig.suptitle(f"{head}\nlink {link.get('name', '?')}: "
                 f"{link.get('bandwidth_bps', float('nan')) / 1e6:g} Mbit/s, "
                 f"RTT {link.get('rtt_s', float('nan')) * 1e3:g} ms (emulated)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


_QM_STYLE = {"plain/bf16/masked": ("masked top-k", "C7", "x--"),
             "plain/bf16/gate": ("group gate", "C0", "o-"),
             "residency/bf16/masked": ("residency-trained LM, masked top-k", "C2", "x:"),
             "residency/bf16/gate": ("residency-trained LM + gate", "C2", "s-"),
             "residency/int8/gate": ("residency LM + int8 experts + gate", "C1", "^-"),
             "residency/int4/gate": ("residency LM + int4 experts + gate", "C3", "v-"),
             "residency/int4/masked": ("residency LM + int4 experts, masked", "C3", "1:"),
             "plain/int8/gate": ("int8 experts + gate", "C1", "^:"),
             "plain/int4/gate": ("int4 experts + gate", "C4", "v:"),
             "plain/int4/masked": ("int4 experts, masked top-k", "C4", "1--"),
             "plain/mixed/gate": ("mixed int2/4/8 experts (count first) + gate", "C5", "D-"),
             "residency/mixed/gate": ("residency LM + mixed int2/4/8 + gate", "C6", "D:")}


def plot_quality_memory(result: dict, path: str) -> str:
    """Bits/char against the end's expert memory (share of its layers' bf16 expert bytes),
    one panel per model, one line per method, the full model and +3% as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.4), dpi=120,
                             squeeze=False)
    for ax, (name, entry) in zip(axes[0], models.items(), strict=True):
        full = entry["full"].get("plain")
        for variant, (label, color, style) in _QM_STYLE.items():
            pts = sorted((p["fraction"], p["bits_per_char"]) for p in entry["points"]
                         if p["variant"] == variant and p["feasible"])
            if pts:
                ax.plot([100 * f for f, _ in pts], [b for _, b in pts], style, color=color,
                        label=label, ms=5)
        if full is not None:
            ax.axhline(full, color="k", lw=1, label=f"full model {full:.3f}")
            ax.axhline(full * 1.03, color="k", ls=":", lw=1, label="full + 3%")
            top = max([p["bits_per_char"] for p in entry["points"] if p["feasible"]]
                      + [full * 1.1])
            ax.set_yscale("log")
            ax.set_ylim(full * 0.98, top * 1.05)
            from matplotlib.ticker import FormatStrFormatter

            ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
        c = entry["config"]
        ax.set_title(f"{name}: {c['num_experts']} experts top-{c['top_k']}"
                     + (f" + shared {c['shared_expert_dim']}" if c["shared_expert_dim"] else ""))
        ax.set_xlabel("end memory for expert weights, % of its layers' bf16 expert bytes")
        ax.set_ylabel("bits/char, held-out test text (measured)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
