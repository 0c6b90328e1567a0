"""The report's figures, drawn on matplotlib's Agg canvas (no display, and no pyplot: importing
this module never changes the backend of a notebook)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from chainrule.sweeps.powerlaw import PowerLaw


def _figure(width: float, height: float, panels: int = 1):
    fig = Figure(figsize=(width * panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, panels, i + 1) for i in range(panels)]


def _colors(n: int):
    cmap = colormaps["viridis"]
    return [cmap(v) for v in np.linspace(0.0, 0.9, max(n, 1))]


def scaling_plot(path: Path, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], *,
                 xlabel: str, ylabel: str, title: str, symbol: str = "N",
                 fits: Sequence[tuple[str, PowerLaw]] = (),
                 highlight: Sequence[int] | None = None) -> Path:
    """Log-log scatter of the jobs with the fitted power laws (in `symbol`) drawn through
    them; `highlight` marks the points a fit used when it used only some (the frontier)."""
    fig, (ax,) = _figure(6.4, 5.2)
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    used = np.zeros(len(xs), bool)
    used[list(range(len(xs))) if highlight is None else list(highlight)] = True
    ax.scatter(xs[used], ys[used], color="C0", zorder=3, label="jobs" if highlight is None
               else "jobs on the frontier (fitted)")
    if not used.all():
        ax.scatter(xs[~used], ys[~used], color="0.6", zorder=2, label="other jobs")
    for x, y, label in zip(xs, ys, labels, strict=True):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if len(xs):
        grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 100)
        for (name, fit), style in zip(fits, ("-", "--", ":"), strict=False):
            ax.plot(grid, fit(grid), style, color="C3", label=f"{name}: {fit.describe(symbol)}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%.2f"))  # losses span less than a decade: plain numbers
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(fontsize=7, loc="outside lower center")
    fig.savefig(path, dpi=120)
    return path


def curves_plot(path: Path, runs: Sequence[tuple[str, dict]], *, title: str,
                metrics: Sequence[tuple[str, str]] = (("train/loss", "training loss"),
                                                      ("val/loss", "validation loss"))) -> Path:
    """One panel per metric, one line per job; `runs` is [(label, Job.curves())] in the
    order the colours should run (small to large)."""
    fig, axes = _figure(5.2, 4.2, panels=len(metrics))
    for (label, curves), color in zip(runs, _colors(len(runs)), strict=True):
        for ax, (key, _) in zip(axes, metrics, strict=True):
            if key in curves:
                steps, values = curves[key]
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, color=color,
                        label=label, lw=1.2)
    for ax, (_, name) in zip(axes, metrics, strict=True):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    if runs:
        axes[-1].legend(fontsize=6, ncol=1 + len(runs) // 12, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    return path


def overrides_plot(path: Path, panels: Sequence[tuple[str, list[float], list[float]]], *,
                   ylabel: str, title: str) -> Path:
    """The metric against each numeric override the jobs varied (the learning rate of a
    search, the width of a ladder); a log x axis when the values span a decade or more."""
    fig, axes = _figure(4.6, 3.8, panels=len(panels))
    for ax, (key, xs, ys) in zip(axes, panels, strict=True):
        ax.scatter(xs, ys, color="C0")
        positive = min(xs) > 0
        if positive and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        best = int(np.argmin(ys))
        ax.scatter([xs[best]], [ys[best]], color="C3", zorder=3, label=f"best: {xs[best]:.4g}")
        ax.set_xlabel(key)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120)
    return path
