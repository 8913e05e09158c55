"""Plan heatmaps (for `moa-vllm plan show --png`)."""

from __future__ import annotations

import numpy as np

from moa_vllm.plan import Plan
from moa_vllm.span_mask import elastic_length, first_needed_position, quantize_beta, window_size


def span_matrix(plan: Plan, length: int) -> np.ndarray:
    """``[layers, kv_heads]``: fraction of a ``length``-token cache each head reads
    (sinks + window, as in ``span_classes.average_density``)."""
    out = np.zeros((plan.model.num_layers, plan.model.num_kv_heads))
    n = elastic_length(length, length, plan.elastic)
    for l, row in enumerate(plan.rules):
        for h, (alpha, beta) in enumerate(row):
            w = window_size(alpha, quantize_beta(beta), n, plan.min_window)
            first = first_needed_position(length, w, plan.sink_tokens)
            out[l, h] = min(min(plan.sink_tokens, length) + max(0, length - first), length) / length
    return out


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
    ax.set_title(f"span / length at {length} (mean {m.mean():.2f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
