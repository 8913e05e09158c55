"""The search's length policy: where it profiles, validates and holds its budgets."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moa_vllm.planner.search_config import SearchConfig
from moa_vllm.span_classes import objective_lengths


def default_samples(length: int) -> int:
    """About 16k tokens per profiling length (at least one sample)."""
    return max(1, 16384 // length)


@dataclass(frozen=True)
class SearchLengths:
    """The lengths one search works at (``resolve_lengths``)."""

    profile: list[int]  # one loss each (the Pareto sweep's objectives)
    samples: list[int]
    validate: list[int]  # unseen: one shorter and one longer than the profiled ones
    validate_samples: list[int]
    density: list[int]  # where the density budgets hold


def resolve_lengths(cfg: SearchConfig, context: int) -> SearchLengths:
    """Defaults span the windowed prompts a server sees (those above the exact floor):
    profiling from the floor, where it stops binding (512 without one: SmolLM2 rules
    searched with a profile at 1024 kept a sixth of the excess loss at 1152 tokens
    that rules searched from 3/2 of the floor kept, docs/plan-search.md); validation
    just past the floor (else below the shortest profile), between the two shortest
    (most requests are short) and beyond the longest; budgets from ``budget_start``
    up to the context. Nothing is validated or budgeted at or below the floor: the
    plan is exact there."""
    floor = cfg.exact_floor
    doublings = [n for n in _doublings(512, min(context // 2, 16384)) if n > floor]
    profile = sorted(cfg.lengths or ({floor} if floor else set()) | set(doublings))
    validate = sorted(cfg.validate_lengths if cfg.validate_lengths is not None else
                      {max(profile[0] * 3 // 4, floor * 9 // 8), profile[0] * 3 // 2,
                       min(context, profile[-1] * 3 // 2)} - set(profile))
    if profile[0] < floor or min(validate, default=floor + 1) <= floor:
        raise ValueError(f"profiling lengths must be at least the exact floor ({floor}) and "
                         f"validation lengths above it: the plan is exact below; got "
                         f"{min(profile + validate)}")
    samples = cfg.samples or [default_samples(n) for n in profile]
    vsamples = cfg.validate_samples or [max(2, 8192 // n) for n in validate]
    if len(samples) != len(profile) or len(vsamples) != len(validate):
        raise ValueError("--samples and --validate-samples need one count per length")
    start = budget_start(cfg.density, cfg.sink_tokens, cfg.min_window)
    density = sorted(set(cfg.density_lengths or
                         [n for n in profile + validate + [start] + objective_lengths(context)
                          if max(start, floor + 1) <= n <= context]))
    return SearchLengths(profile, samples, validate, vsamples, density)


def budget_start(density: float, sink_tokens: int, min_window: int) -> int:
    """Shortest length the default budgets hold at: where sinks + ``min_window`` are
    at most half the budget. Shorter, a budget forces every head to that floor, so
    no plan can differ from the uniform window at short prompts (a 0.5 budget at
    256 tokens did exactly that). A request shorter than this holds no more than
    one of this length does (held blocks grow with the length under every rule)."""
    return math.ceil(2 * (sink_tokens + min_window) / density)


def _doublings(start: int, stop: int) -> list[int]:
    out = [start]
    while out[-1] * 2 <= stop:
        out.append(out[-1] * 2)
    return out
