"""Figures for an analysis: per-layer normalized traces and spectral densities.

matplotlib is an optional dependency (``pip install 'hawq-onnx[plot]'``): it is imported
only here, only when a plot is asked for, and its absence is a one-line user error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hawq_onnx.errors import HawqError
from hawq_onnx.hessian.density import smoothed_density
from hawq_onnx.hessian.result import AnalysisResult, DensityResult

MISSING_MATPLOTLIB = "--plot needs matplotlib: pip install 'hawq-onnx[plot]'"


def require_matplotlib() -> Any:
    """The ``matplotlib.pyplot`` module on a non-interactive backend, or a HawqError."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise HawqError(MISSING_MATPLOTLIB) from exc
    return plt


def plot_analysis(result: AnalysisResult, path: str | Path) -> Path:
    """Write the figure to ``path`` (format from the suffix, e.g. .png, .pdf, .svg)."""
    plt = require_matplotlib()
    panels = 2 if result.density else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6.0, 0.5 * len(result.layers) + 3),
                                                 3.6 * panels), squeeze=False)
    _traces_panel(axes[0][0], result)
    if result.density:
        _density_panel(axes[1][0], result.density)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _traces_panel(ax: Any, result: AnalysisResult) -> None:
    names = [layer.name for layer in result.layers]
    values = np.array([layer.average_eigenvalue for layer in result.layers])
    errors = np.array([(layer.trace_se or 0.0) / layer.params if layer.params else 0.0
                       for layer in result.layers])
    x = np.arange(len(names))
    ax.bar(x, values, yerr=errors, color="tab:blue", capsize=2, label="trace / params")
    tops = [layer.top_eigenvalue for layer in result.layers]
    if any(t is not None for t in tops):
        ax.plot(x, [t if t is not None else np.nan for t in tops], "o", color="tab:red",
                label="top eigenvalue")
    if np.all(values > 0):
        ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("Hessian trace / params")
    ax.set_title(f"per-layer sensitivity ({result.probes} probes)")
    ax.legend(fontsize=8)


def _density_panel(ax: Any, densities: list[DensityResult]) -> None:
    nodes = np.concatenate([np.concatenate([np.asarray(n) for n in d.nodes])
                            for d in densities])
    low, high = float(nodes.min()), float(nodes.max())
    pad = 0.05 * max(high - low, 1e-12)
    grid = np.linspace(low - pad, high + pad, 1000)
    for density in densities[:12]:
        curve = smoothed_density(density.nodes, density.weights, grid,
                                 sigma=(grid[-1] - grid[0]) / 200)
        ax.semilogy(grid, np.maximum(curve, 1e-12), label=density.scope)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title("spectral density (SLQ)")
    if len(densities) > 1:
        ax.legend(fontsize=7)

