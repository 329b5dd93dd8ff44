"""PNG of the KV sensitivity: KL per layer for K and V at each candidate width."""

from __future__ import annotations

from pathlib import Path

from .sensitivity import KVSensitivity


def plot_kv_sensitivity(
    sens: KVSensitivity,
    path: str | Path,
    chosen: dict[int, tuple[int, int]] | None = None,
    title: str = "KV cache sensitivity",
) -> Path:
    """Grouped bars (log scale): one group per KV layer, bars for K and V at each width.

    The chosen width of each tensor is outlined in black.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(sens.kl)
    bits = sorted(sens.candidate_bits)
    series = [(t, b) for t in ("k", "v") for b in bits]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(layers) + 2), 3.6), dpi=120)
    colors = plt.get_cmap("tab20")
    floor = 1e-9
    for s, (t, b) in enumerate(series):
        xs = [li + (s - (len(series) - 1) / 2) * width for li in range(len(layers))]
        ys = [max(sens.kl[i][t][b], floor) for i in layers]
        edges = [
            "black" if chosen and chosen.get(i, (None, None))[0 if t == "k" else 1] == b else "none"
            for i in layers
        ]
        ax.bar(xs, ys, width, label=f"{t.upper()} {b}-bit", color=colors(s), edgecolor=edges, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_ylabel("KL vs full-precision KV (nats/token)")
    ax.set_title(title + (" (outlined: chosen)" if chosen else ""))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
