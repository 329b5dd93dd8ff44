"""PNG plot of per-layer sensitivity and chosen bits (written next to the model)."""

from __future__ import annotations

import io
from typing import Any


def short_name(path: str) -> str:
    parts = path.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[i + 1 :])
    return parts[-1]


def sensitivity_png(layers: list[dict[str, Any]], title: str, static: bool = False) -> bytes:
    """``layers``: [{"path", "bits", "kl": {bits: value}}] in model order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [short_name(d["path"]) for d in layers]
    n = len(names)
    all_bits = sorted({int(b) for d in layers for b in d.get("kl", {})})
    fig, (ax1, ax2) = plt.subplots(
        2, 1, figsize=(max(8.0, 0.18 * n + 2), 7.5), sharex=True,
        gridspec_kw={"height_ratios": [3, 1.4]},
    )
    cmap = plt.get_cmap("viridis")
    xs = list(range(n))
    for k, b in enumerate(all_bits):
        ys = [d["kl"].get(str(b), d["kl"].get(b)) for d in layers]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0]
        color = cmap(k / max(len(all_bits) - 1, 1))
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], "-", lw=0.8, color=color, label=f"{b}-bit")
            # filled markers: measured by forward passes; hollow: estimated/predicted
            meas = [(x, y) for (x, y), d in zip(zip(xs, ys), layers)
                    if y is not None and y > 0 and b in d.get("measured", [])]
            est = [(x, y) for (x, y), d in zip(zip(xs, ys), layers)
                   if y is not None and y > 0 and b not in d.get("measured", [])]
            if meas:
                ax1.plot([p[0] for p in meas], [p[1] for p in meas], "o", ms=3.5, color=color)
            if est:
                ax1.plot([p[0] for p in est], [p[1] for p in est], "o", ms=3.5, mfc="none", color=color)
    ax1.set_yscale("log")
    if static:
        ax1.set_ylabel("static prior (relative weight error x rule weight)")
    else:
        ax1.set_ylabel(
            "KL to full precision (nats/token)\nwith only this layer quantized\n(filled: measured, hollow: estimated)"
        )
    ax1.set_title(title)
    ax1.grid(True, which="both", alpha=0.25)
    if all_bits:
        ax1.legend(fontsize=8, ncol=min(len(all_bits), 6))
    chosen = [d.get("bits") or 0 for d in layers]
    colors = [cmap((all_bits.index(b) if b in all_bits else 0) / max(len(all_bits) - 1, 1)) for b in chosen]
    ax2.bar(xs, chosen, color=colors)
    ax2.set_ylabel("chosen bits")
    ax2.set_ylim(0, max(chosen + [8]) + 0.5)
    ax2.set_xticks(xs)
    ax2.set_xticklabels(names, rotation=90, fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
