"""Random importance tensors shaped like real profiles (tests and the benchmark)."""

from __future__ import annotations

import numpy as np

from moa_vllm.planner.milp import Problem, cost_tables
from moa_vllm.planner.rules import Rule, default_rules, rule_losses
from moa_vllm.span_classes import num_head_classes
from moa_vllm.span_mask import SpanParams


def random_importance(layers: int, heads: int, length: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """``[layers, heads, nb, nb]``: per head a sink weight, a local decay with a random
    scale and a random long-range floor, times log-normal noise; causal tiles only."""
    nb = -(-length // block)
    qi = np.arange(nb)[:, None]
    kj = np.arange(nb)[None, :]
    dist = (qi - kj).astype(float)
    causal = dist >= 0
    out = np.zeros((layers, heads, nb, nb))
    for l in range(layers):
        for h in range(heads):
            scale = np.exp(rng.uniform(np.log(0.5), np.log(nb)))
            floor = np.exp(rng.uniform(np.log(1e-4), np.log(1e-1)))
            sink = rng.uniform(0, 2)
            t = np.exp(-dist / scale) + floor + sink * (kj == 0)
            t = t * rng.lognormal(0, 0.5, size=t.shape)
            out[l, h] = np.where(causal, t, 0.0) * rng.lognormal(0, 1)
    return out


def random_problem(
    layers: int,
    heads: int,
    lengths: list[int],
    density_lengths: list[int],
    density: float,
    max_context: int,
    seed: int = 0,
    block: int = 64,
    sink_tokens: int = 64,
    min_window: int = 64,
    elastic: str = "position",
    block_size: int = 16,
    rules: list[Rule] | None = None,
    max_head_classes: int = 9,
    allocated_density: float | None = None,
) -> tuple[Problem, list[Rule]]:
    rng = np.random.default_rng(seed)
    params = SpanParams(sink_tokens, min_window, elastic)
    rules = rules or default_rules(max_context, params, density)
    losses = np.stack([
        rule_losses(random_importance(layers, heads, n, block, rng), rules, n, block, params)
        for n in lengths
    ])
    dens, held, dense = cost_tables(rules, density_lengths, params, block_size)
    prob = Problem(losses, dens, held, dense, density,
                   allocated_density if allocated_density is not None else density,
                   num_head_classes(layers * heads, max_head_classes))
    return prob, rules
