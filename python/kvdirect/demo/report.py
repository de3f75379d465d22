"""What both demo experiments write: the machine they ran on, TTFT statistics,
the table (plain text for the terminal, markdown for the README), a grouped-bar
chart and the JSON file. One sign convention everywhere: a *change* is a ratio
minus one, negative when faster."""
from __future__ import annotations

import json
import os
import platform

import numpy as np


def machine_info(device: str = "cpu") -> dict:
    from kvdirect.runtime import cpu_model

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "device": device}
    try:
        import torch
        import transformers

        info["torch"], info["transformers"] = torch.__version__, transformers.__version__
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def ttft_stats(ms, mode: str) -> dict:
    """``ttft_{mean,p50,p99}_ms_MODE`` of a list of TTFTs in ms."""
    a = np.asarray(ms, dtype=np.float64)
    return {f"ttft_mean_ms_{mode}": float(a.mean()), f"ttft_p50_ms_{mode}": float(np.percentile(a, 50)),
            f"ttft_p99_ms_{mode}": float(np.percentile(a, 99))}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def change(x) -> str:
    """A change (ratio - 1) with its sign: -95.7% is faster."""
    return "-" if x is None else f"{100 * x:+.1f}%"


def render(head: list[str], rows: list[list[str]], *, markdown: bool = False) -> str:
    """A table: right-aligned columns for the terminal, or markdown."""
    if markdown:
        md = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
        return "\n".join([md(head), "|" + "---|" * len(head)] + [md(r) for r in rows])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def bar_plot(path: str, groups: list[str], series: dict, *, xlabel: str, ylabel: str, title: str,
             colors: dict | None = None, notes: dict | None = None, footnote: str | None = None,
             figsize=(7, 4)) -> None:
    """Grouped bars: ``series`` maps a label to one value per group; ``notes[label]``
    (one string per group) is written above that series' bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(groups))
    w = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=figsize, dpi=120)
    for i, (label, vals) in enumerate(series.items()):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, label=label,
                      color=(colors or {}).get(label))
        for b, text in zip(bars, (notes or {}).get(label, ())):
            ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, groups)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    # beside the axes: inside, a legend of many modes covers the short bars it names
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if footnote:
        fig.text(0.01, 0.01, footnote, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def write_outputs(result: dict, *, json_path: str | None, plot_path: str | None, plot) -> list[str]:
    """``--json`` / ``--plot`` of either experiment; returns the paths written."""
    written = []
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        written.append(json_path)
    if plot_path:
        plot(result, plot_path)
        written.append(plot_path)
    return written
