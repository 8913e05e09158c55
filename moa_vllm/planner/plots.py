"""Plan heatmaps (for `moa-vllm plan show --png`)."""

from __future__ import annotations

import numpy as np

from moa_vllm.plan import Plan
from moa_vllm.span_classes import head_density


def span_matrix(plan: Plan, length: int) -> np.ndarray:
    """``[layers, kv_heads]``: fraction of a ``length``-token cache each head reads
    (the terms of ``span_classes.average_density``); NaN for the model's windowed
    layers."""
    heads, params = plan.model.num_kv_heads, plan.span_params
    return np.array([[np.nan] * heads if row is None else
                     [head_density(alpha, beta, length, params) for alpha, beta in row]
                     for row in plan.rules])


def plan_heatmap(plan: Plan, length: int, path) -> None:
    """Layer x KV head heatmap of each head's span (fraction of ``length``) at ``length``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = span_matrix(plan, length)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * m.shape[1], 1.5 + 0.22 * m.shape[0]))
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(m.shape[1]))
    ax.set_title(f"span / length at {length} (mean {np.nanmean(m):.2f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
