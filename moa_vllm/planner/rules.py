"""The search space: span rules, their loss on a profile and their cost.

Everything here uses the runtime's integer arithmetic (``moa_vllm.span_mask``):
``W = max(min_window, alpha + ceil(beta_q * N / BETA_SCALE))`` with the same
elastic ``N`` as the plan being made.

Rule loss (block approximation). The profile holds, per ``block x block`` tile, the
summed first-order effect of dropping each causal entry of the tile. A rule's loss
is ``sum_tiles importance(tile) * dropped(tile)``, where ``dropped`` is the exact
fraction of the tile's causal entries that the rule's token-level mask removes
(computed row by row from the true mask, sinks included). The approximation is
that the importance is spread evenly over a tile's causal entries; tiles that are
entirely kept or entirely dropped are exact. Tiles on the window edge are split
proportionally; tiles on the diagonal are always kept (``min_window >= 1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moa_vllm.span_classes import HeadClass, cdiv, head_density
from moa_vllm.span_mask import (
    FULL_WINDOW,
    SpanParams,
    beta_growth,
    quantize_beta,
    window_size,
    window_start,
)


@dataclass(frozen=True)
class Rule:
    alpha: int
    beta: float

    @property
    def beta_q(self) -> int:
        return quantize_beta(self.beta)

    def window(self, n: int, min_window: int) -> int:
        return window_size(self.alpha, self.beta_q, n, min_window)

    def as_tuple(self) -> tuple[int, float]:
        return (int(self.alpha), float(self.beta))


def default_rules(max_context: int, params: SpanParams,
                  density: float | None = None) -> list[Rule]:
    """About 48 rules scaled to the model's context ``C`` (the reference's grid is
    alpha in {-1024, 0, ..., 8192}, beta in {0, 1/8, ..., 1} for its models):

    * static windows ``alpha in C * {1/64, 1/32, 1/16, 1/8, 3/16, 1/4, 3/8, 1/2, 3/4, 1}``;
    * elastic rules ``beta in {1/8, ..., 1}`` x ``alpha in {-C/8, -sink_tokens, C/32,
      C/16, C/8}``, dropping rules that never exceed ``min_window`` within ``C``;
    * the growing uniform window of ``density`` (``-sink_tokens``, ``density``).

    ``alpha = -sink_tokens`` makes sinks + window exactly ``beta`` of the input, so
    the equal-density uniform plan is a point of the search space: the MILP can
    only improve on it (on the profile)."""
    c, min_window, sink_tokens = max_context, params.min_window, params.sink_tokens
    rules = []
    for f in (1 / 64, 1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1):
        rules.append(Rule(max(min_window, int(round(f * c))), 0.0))
    elastic_alphas = [int(round(-c / 8)), -sink_tokens] + [int(round(f * c)) for f in (1 / 32, 1 / 16, 1 / 8)]
    for beta in (i / 8 for i in range(1, 9)):
        for alpha in elastic_alphas:
            if alpha + beta * c <= min_window:
                continue
            rules.append(Rule(alpha, beta))
    if density is not None and 0 < density < 1:
        rules.append(Rule(-sink_tokens, density))
    return sorted(set(rules), key=lambda r: (r.beta, r.alpha))


def parse_rules(text: str) -> list[Rule]:
    """``"alpha:beta,alpha:beta,..."``."""
    rules = []
    for item in text.split(","):
        a, b = item.split(":")
        rules.append(Rule(int(a), float(b)))
    return rules


def dropped_fraction(
    rule: Rule,
    length: int,
    block: int,
    params: SpanParams,
    prompt_len: int | None = None,
) -> np.ndarray:
    """``[nb, nb]``: fraction of each tile's causal entries the rule's mask drops."""
    t = np.arange(length, dtype=np.int64)
    if params.elastic == "position":
        n = t + 1
    else:
        n = np.full_like(t, prompt_len or length)
    w = np.maximum(params.min_window, rule.alpha + beta_growth(rule.beta_q, n))
    w = np.where(n <= params.exact_floor, FULL_WINDOW, w)
    lo = np.maximum(0, window_start(t, w, params.granule))  # window keys [lo, t]
    s = np.minimum(params.sink_tokens, t + 1)  # sink keys [0, s)
    lo = np.maximum(lo, s)  # disjoint union [0, s) + [lo, t]
    nb = cdiv(length, block)
    kb0 = np.arange(nb, dtype=np.int64) * block
    kb1 = kb0 + block

    def overlap(a0, a1):  # |[a0, a1) & [kb0, kb1)| per row x block
        return np.clip(np.minimum(a1[:, None], kb1[None]) - np.maximum(a0[:, None], kb0[None]), 0, None)

    causal = overlap(np.zeros_like(t), t + 1)
    kept = overlap(np.zeros_like(t), s) + overlap(lo, t + 1)
    rows = np.arange(length) // block
    causal_b = np.zeros((nb, nb))
    dropped_b = np.zeros((nb, nb))
    np.add.at(causal_b, rows, causal)
    np.add.at(dropped_b, rows, causal - kept)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(causal_b > 0, dropped_b / np.maximum(causal_b, 1), 0.0)
    return frac


def rule_losses(
    importance: np.ndarray,
    rules: list[Rule],
    length: int,
    block: int,
    params: SpanParams,
    prompt_len: int | None = None,
) -> np.ndarray:
    """``[layers, kv_heads, rules]`` loss of each rule on one length's profile."""
    nb = importance.shape[-1]
    out = np.zeros(importance.shape[:2] + (len(rules),))
    flat = importance.reshape(-1, nb * nb)
    for r, rule in enumerate(rules):
        frac = dropped_fraction(rule, nb * block, block, params, prompt_len)
        out[..., r] = (flat @ frac.reshape(-1)).reshape(importance.shape[:2])
    return out


def rule_density(rule: Rule, length: int, params: SpanParams) -> float:
    """The per-head term of ``span_classes.average_density`` at ``length``."""
    return head_density(rule.alpha, rule.beta, length, params)


def rule_held_blocks(rule: Rule, length: int, params: SpanParams, block_size: int) -> int:
    """``HeadClass.held_blocks`` of a class whose widest rule is this one (held
    blocks only grow with the window, so a class holds its widest rule's count)."""
    head_class = HeadClass(0, (), ((rule.alpha, rule.beta_q),), params)
    return head_class.held_blocks(length, length, block_size)
