"""accuracy.png: quality vs KV sparsity, the answer of an eval grid at a glance.

One panel per (data, metric); in each, one line per policy curve (colour) and KV precision
(line style: 16 bits solid, 8 dashed, 4 dotted), dense as a horizontal line per precision.
Perplexity panels use a log y-axis. Points with a fixed `budget_tokens` instead of a sparsity
have no place on the x-axis and are left out (they are in the CSV).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # the object API: no pyplot state, renders with Agg
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter


_STYLES = {16: "-", 8: "--", 4: ":"}
_PLOT_SKIP = {"policy", "sparsity", "budget_tokens", "bits"}
_HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "perplexity": False}


def curve_name(kv_config: str) -> str:
    """The policy and its non-default settings, without sparsity and bits (those are x and style)."""
    d = json.loads(kv_config)  # holds only non-default settings (see runner.run_eval.kv_config)
    extra = [f"{k}={v}" for k, v in sorted(d.items()) if k not in _PLOT_SKIP]
    return " ".join([d["policy"], *extra])


def plot_accuracy(rows: Sequence[dict[str, Any]], path: str | Path, *, title: str) -> Path:
    """Draw `rows` (accuracy.csv rows, values as text or numbers) to `path`; returns the path."""
    panels = list(dict.fromkeys((r["data"], r["metric"]) for r in rows)) or [("", "")]
    cols = min(2, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(7 * cols, 4.2 * nrows + 1.2), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    names = sorted({curve_name(r["kv_config"]) for r in rows if r["kv_policy"] != "dense"})
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    handles: dict[str, Any] = {}
    for ax, (data, metric) in zip(axes, panels):
        here = [r for r in rows if (r["data"], r["metric"]) == (data, metric)]
        _panel(ax, here, colors, handles)
        better = {True: "higher is better", False: "lower is better"}.get(_HIGHER_IS_BETTER.get(metric))
        n = here[0].get("questions") if here else None  # small n: a few points of accuracy are noise
        ax.set_title(f"{data}: {metric}" + (f", n={n}" if n else "") + (f" ({better})" if better else ""),
                     fontsize=10)
        ax.set_xlabel("KV sparsity (fraction of cached tokens not attended)")
        ax.set_ylabel(metric)
        ax.set_xlim(-0.03, 1.0)  # sparsity 0 (dense) to 1, so grids of different ranges look alike
        if metric == "perplexity":
            ax.set_yscale("log")
            # Plain numbers (35, 50, 100) instead of 3.5x10^1: perplexities are read, not estimated.
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if not rows:
        axes[0].text(0.5, 0.5, "no rows yet", ha="center", va="center", transform=axes[0].transAxes)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(len(handles), 5),
                   fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _panel(ax, rows: list[dict[str, Any]], colors: dict[str, str], handles: dict[str, Any]) -> None:
    for r in rows:
        if r["kv_policy"] == "dense":
            bits = int(r["bits"])
            label = "dense" + ("" if bits == 16 else f" int{bits}")
            handles[label] = ax.axhline(float(r["value"]), color="black", linestyle=_STYLES.get(bits, "-"),
                                        linewidth=1.2, label=label)
    curves: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in rows:
        if r["kv_policy"] != "dense" and str(r["sparsity"]) != "":
            key = (curve_name(r["kv_config"]), int(r["bits"]))
            curves.setdefault(key, []).append((float(r["sparsity"]), float(r["value"])))
    for (name, bits), pts in sorted(curves.items()):
        xs, ys = zip(*sorted(pts))
        label = name + ("" if bits == 16 else f" int{bits}")
        handles[label], = ax.plot(xs, ys, marker="o", markersize=4, color=colors[name],
                                  linestyle=_STYLES.get(bits, "-"), label=label)
