"""PNG plots of results (matplotlib is an optional dependency: ``pip install .[plot]``)."""

from __future__ import annotations


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
