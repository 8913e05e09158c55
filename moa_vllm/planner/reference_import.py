"""`moa-vllm plan import`: the MoA authors' published plans (github.com/thu-nics/MoA,
MIT licence) as plans of ours, one rule per KV head.

Their plan is ``{"alphas": [[...]], "betas": [[...]]}`` per layer and *query* head
(they convert a GQA model to MHA before searching). Their runtime
(``moa_config_to_cache_config`` and the prefill kernel it feeds) gives each head, once
per request, a cache of ``C = ceil64(max(min(int(alpha + beta * N), N), 128))``
tokens with ``N = prompt + 1024`` (their ``max_new_token``): the first 64 tokens
(sinks) and a circular buffer of the last ``C - 64``, which decode reads; prefill
reads the same band in 64-token blocks, which starts no earlier. In our semantics
(``span_mask``) that head is a prompt-elastic rule with 64 sinks whose window at
prompt length ``P`` is at least ``C(P) - 64``: our window start, rounded down to
the granule, is then never later than theirs, in prefill and in decode. Position
mode cannot hold it: their prefill queries read a band sized by the whole prompt.

A KV head serves every query head of its group, so it reads at least the widest
member's window at every length. The import takes, per KV head, the rule
``(alpha, beta)`` that is at or above that envelope at every prompt length from just
above the exact floor to the model's context and holds the least over those
lengths (``fit_rule``: exact, by the corners of the feasible rules, in our integer
arithmetic, then checked). Between the envelope's step points it is constant and
our window grows, so the check at the step points covers every length.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
import math
from pathlib import Path
from typing import Any

import numpy as np

from moa_vllm.plan import (
    PLAN_VERSION,
    ModelFingerprint,
    Plan,
    PlanError,
    Provenance,
    now_iso,
)
from moa_vllm.span_classes import head_class_assignment, head_density, objective_lengths
from moa_vllm.span_mask import BETA_SCALE, SpanParams, beta_growth

AUTHORS_REPOSITORY = "github.com/thu-nics/MoA"
AUTHORS_LICENCE = "MIT"
# Their runtime's constants (moa_config_to_cache_config's defaults, as their Llama
# model calls it): sinks, cache granule, smallest cache, and the generation
# headroom added to the prompt length.
SINK_TOKENS = 64
SPLIT = 64
MIN_CACHE = 128
MAX_NEW_TOKENS = 1024
# Ours on top: exact up to 1024 prompt tokens and 64-token window starts, as the
# searched plans; the smallest window their runtime gives (128 - 64 sinks).
EXACT_FLOOR = 1024
GRANULE = 64
MIN_WINDOW = MIN_CACHE - SINK_TOKENS
SPANS = SpanParams(SINK_TOKENS, MIN_WINDOW, "prompt", GRANULE, EXACT_FLOOR)
MAX_HEAD_CLASSES = 32
LABEL = "converted, not validated by us"


def authors_cache(alpha: float, beta: float, prompt_len):
    """Their cache tokens of one query head (sinks included) at ``prompt_len``
    (int or numpy array), in their arithmetic: ``int()`` truncates the float."""
    n = np.asarray(prompt_len, dtype=np.int64) + MAX_NEW_TOKENS
    size = np.trunc(alpha + n * beta).astype(np.int64)
    size = np.maximum(np.minimum(size, n), MIN_CACHE)
    return -(-size // SPLIT) * SPLIT


def authors_window(alpha: float, beta: float, prompt_len):
    """Keys past the sinks that their head reads at ``prompt_len``."""
    return authors_cache(alpha, beta, prompt_len) - SINK_TOKENS


def nominal_density(alphas: list[list[float]], betas: list[list[float]],
                    prompt_len: int) -> float:
    """Their own density at ``prompt_len`` (the ``ratio`` their runtime prints):
    cache over ``prompt_len + 1024``, averaged over query heads of the MHA-expanded
    model."""
    caches = [authors_cache(a, b, prompt_len) for ra, rb in zip(alphas, betas)
              for a, b in zip(ra, rb)]
    return float(np.mean(caches)) / (prompt_len + MAX_NEW_TOKENS)


def _envelope_points(members: list[tuple[float, float]], lo: int, hi: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The lengths where the widest member window steps up in ``[lo, hi]`` (and
    ``lo``), with the window there."""
    lengths = np.arange(lo, hi + 1, dtype=np.int64)
    envelope = np.max([authors_window(a, b, lengths) for a, b in members], axis=0)
    steps = np.flatnonzero(np.diff(envelope)) + 1
    at = np.concatenate([[0], steps])
    return lengths[at], envelope[at]


def _upper_hull(points: np.ndarray, need: np.ndarray) -> list[int]:
    """Indices of the upper convex hull of ``(points, need)``, ``points`` increasing."""
    hull: list[int] = []
    for i in range(len(points)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = ((points[b] - points[a]) * (need[i] - need[a])
                     - (need[b] - need[a]) * (points[i] - points[a]))
            if cross < 0:
                break
            hull.pop()
        hull.append(i)
    return hull


def fit_rule(members: list[tuple[float, float]], lo: int, hi: int,
             objective: list[int]) -> tuple[int, float]:
    """The rule at or above every member's window at every prompt length in
    ``[lo, hi]`` that holds the least, summed over the ``objective`` lengths.

    The rules at or above the envelope form a convex polygon in ``(alpha, beta)``
    whose corners have the slopes of the envelope's upper hull (and ``beta`` 0 or 1);
    what a rule holds (its density, capped at 1) is concave along each side, so the
    least is at a corner: every corner is tried, in our integer arithmetic."""
    points, need = _envelope_points(members, lo, hi)
    hull = _upper_hull(points, need)
    slopes = {(need[j] - need[i]) / (points[j] - points[i]) for i, j in zip(hull, hull[1:])}
    betas = {0.0, 1.0} | {s for s in slopes if 0.0 < s < 1.0}
    best = None
    for beta_q in {q for b in betas for q in (math.floor(b * BETA_SCALE),
                                             math.ceil(b * BETA_SCALE))}:
        alpha = int(np.max(need - beta_growth(beta_q, points)))
        beta = beta_q / BETA_SCALE
        cost = sum(head_density(alpha, beta, n, SPANS) for n in objective)
        if best is None or (cost, beta_q) < best[:2]:
            best = (cost, beta_q, alpha)
    _, beta_q, alpha = best
    ours = np.array([SPANS.window(alpha, beta_q, int(p)) for p in points])
    assert (ours >= need).all(), (members, alpha, beta_q)
    return alpha, beta_q / BETA_SCALE


def import_reference(data: dict[str, Any], model: ModelFingerprint, context: int | None = None,
                     source: dict[str, Any] | None = None,
                     max_head_classes: int = MAX_HEAD_CLASSES) -> Plan:
    """Our plan for ``model`` from the authors' ``{"alphas", "betas"}``; ``context``:
    the longest prompt the rules must cover (default: the fingerprint's)."""
    where = (source or {}).get("path", "reference plan")
    if not isinstance(data, dict) or not {"alphas", "betas"} <= set(data):
        raise PlanError(f"{where}: the authors' format is {{\"alphas\": [[...]], \"betas\": "
                        "[[...]]}} per layer and query head")
    alphas, betas = data["alphas"], data["betas"]
    shape = (model.num_layers, model.num_attention_heads)
    for name, table in (("alphas", alphas), ("betas", betas)):
        if len(table) != shape[0] or any(len(row) != shape[1] for row in table):
            raise PlanError(f"{where}: {name} must be [{shape[0]}][{shape[1]}] (layers x "
                            f"query heads) for {model.describe()}")
    if model.windowed_layers:
        raise PlanError(f"{where}: the authors' plans are for models without windowed layers")
    context = context or model.max_position_embeddings
    lo = EXACT_FLOOR + 1
    if context < lo:
        raise PlanError(f"{where}: the model's context ({context}) must exceed the exact "
                        f"floor ({EXACT_FLOOR}): below it every head reads every key")
    objective = [n for n in objective_lengths(context) if n >= lo]
    group = model.num_attention_heads // model.num_kv_heads
    fitted: dict[frozenset, tuple[int, float]] = {}
    rules = []
    for ra, rb in zip(alphas, betas):
        row = []
        for kv in range(model.num_kv_heads):
            members = frozenset(zip(ra[kv * group:(kv + 1) * group],
                                    rb[kv * group:(kv + 1) * group]))
            if members not in fitted:
                fitted[members] = fit_rule(sorted(members), lo, context, objective)
            row.append(fitted[members])
        rules.append(row)
    nominal_lengths = sorted({*objective_lengths(context), context})
    details = {
        "label": LABEL,
        "source": {"repository": AUTHORS_REPOSITORY, "licence": AUTHORS_LICENCE,
                   **(source or {})},
        "semantics": {"sink_tokens": SINK_TOKENS, "cache_granule": SPLIT,
                      "min_cache": MIN_CACHE, "max_new_tokens": MAX_NEW_TOKENS,
                      "cache": "ceil64(max(min(int(alpha + beta * (P + 1024)), P + 1024), "
                               "128)) tokens at prompt length P, 64 of them sinks"},
        "gqa_reduction": "per KV head, the least rule at or above the widest member "
                         "window at every prompt length in the fit",
        "fit_lengths": [lo, context],
        "objective_lengths": objective,
        "query_heads_per_kv_head": group,
        "nominal_density": {str(n): round(nominal_density(alphas, betas, n), 4)
                            for n in nominal_lengths},
    }
    plan = Plan(
        version=PLAN_VERSION, model=model, **asdict(SPANS),
        max_head_classes=max_head_classes, rules=rules,
        provenance=Provenance(method="reference-import", created=now_iso(), details=details),
    )
    return plan.model_copy(update={"head_classes": head_class_assignment(plan)})


def source_record(path: Path, commit: str | None, searched_on: str | None) -> dict[str, Any]:
    """Provenance of a source file: its path in the authors' repository (their
    ``examples/<org>--<name>/`` layout gives the model it was searched on), its
    commit and digest."""
    model_dir = path.parent.name
    return {
        "path": f"examples/{model_dir}/{path.name}",
        "commit": commit,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "searched_on": searched_on or model_dir.replace("--", "/", 1),
    }


def model_context(hf_config: Any) -> int:
    """The longest prompt a model serves: its positions, times a linear RoPE
    scaling factor (vicuna-v1.5-16k: 4096 x 4), as vLLM derives ``max_model_len``."""
    text_config = getattr(hf_config, "text_config", None) or hf_config
    positions = text_config.max_position_embeddings
    scaling = getattr(text_config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        positions = int(positions * scaling["factor"])
    return positions
