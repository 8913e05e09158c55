"""The one density report of a plan: what its heads read (average density) and what
vLLM's block pool will hold (allocated density), at several lengths. On a hybrid
model both count MoA's (full-attention) layers; the model density counts the whole
cache against the model's own (its windowed layers windowed by vLLM).

Used by ``plan show``, ``GET /v1/moa/plan``, ``serve``'s banner, the plan search's
provenance and the eval. Pydantic only: no server needed to print it.
"""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel

from moa_vllm.plan import ModelFingerprint, Plan, Provenance
from moa_vllm.span_classes import (
    HeadClass,
    allocated_density,
    assign_head_classes,
    average_density,
    cdiv,
    model_density,
)

REPORT_LENGTHS = (512, 1024, 1536, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
DEFAULT_BLOCK_SIZE = 16  # `plan show`'s unless told; an engine reports its own (/v1/moa/plan)


class DensityAt(BaseModel):
    length: int
    average_density: float
    allocated_density: float
    model_density: float  # the whole cache (windowed layers too) against the model's own


class HeadClassReport(BaseModel):
    index: int
    kv_heads: list[tuple[int, int]]  # (layer, KV head)
    rules: int  # distinct rules in the class; it holds the blocks of the widest
    allocated_density: list[float]  # the class alone, at the report's lengths


class PlanReport(BaseModel):
    source: str
    how: str
    source_status: str = "unchanged"
    """The plan file now: "unchanged", "changed" or "missing". The server keeps
    serving the plan it loaded at start-up; a change applies on restart."""
    model: ModelFingerprint
    provenance: Provenance
    elastic: str
    sink_tokens: int
    min_window: int
    granule: int = 1
    exact_floor: int = 0
    """Prompts up to this many tokens are served exactly (density 1 there)."""
    head_classes: list[HeadClassReport]
    block_size: int
    densities: list[DensityAt]


def report_lengths(plan: Plan) -> list[int]:
    """The report's lengths up to the model's context, and the context itself."""
    context = plan.model.max_position_embeddings
    return sorted({*(n for n in REPORT_LENGTHS if n < context), context})


def density_table(plan: Plan, lengths: list[int], block_size: int,
                  classes: tuple[HeadClass, ...] | None = None) -> list[DensityAt]:
    classes = classes or assign_head_classes(plan)
    return [DensityAt(length=n, average_density=average_density(plan, n),
                      allocated_density=allocated_density(plan, n, block_size, classes),
                      model_density=model_density(plan, n, block_size, classes))
            for n in lengths]


def class_reports(classes: tuple[HeadClass, ...], lengths: list[int],
                  block_size: int) -> list[HeadClassReport]:
    return [HeadClassReport(
                index=c.index, kv_heads=list(c.kv_heads), rules=len(c.rules),
                allocated_density=[c.held_blocks(n, n, block_size) / cdiv(n, block_size)
                                   for n in lengths])
            for c in classes]


def plan_report(plan: Plan, source: str, how: str, block_size: int,
                lengths: list[int] | None = None,
                classes: tuple[HeadClass, ...] | None = None) -> PlanReport:
    """``classes``: the engine's (tensor-parallel KV heads); default: one GPU's."""
    lengths = lengths or report_lengths(plan)
    classes = classes or assign_head_classes(plan)
    return PlanReport(
        source=source, how=how, model=plan.model, provenance=plan.provenance,
        elastic=plan.elastic, sink_tokens=plan.sink_tokens, min_window=plan.min_window,
        granule=plan.granule, exact_floor=plan.exact_floor,
        head_classes=class_reports(classes, lengths, block_size),
        block_size=block_size,
        densities=density_table(plan, lengths, block_size, classes),
    )


def reference_comparison(plan: Plan, lengths: list[int], block_size: int,
                         classes: tuple[HeadClass, ...] | None = None) -> list[dict]:
    """A converted plan of the MoA authors (``plan import``) beside their own
    density at each length where the import recorded it. Theirs is per query head
    of the model converted to MHA, a cache ``query_heads_per_kv_head`` times the
    model's GQA cache, which vLLM holds: ``nominal_of_model_cache`` puts it in
    vLLM's terms. Empty for any other plan."""
    details = plan.provenance.details
    nominal = details.get("nominal_density") if plan.provenance.method == "reference-import" \
        else None
    if not nominal:
        return []
    group = details["query_heads_per_kv_head"]
    return [{"length": d.length, "allocated_density": d.allocated_density,
             "average_density": d.average_density,
             "nominal_density": nominal[str(d.length)],
             "nominal_of_model_cache": nominal[str(d.length)] * group}
            for d in density_table(plan, [n for n in lengths if str(n) in nominal],
                                   block_size, classes)]


def rule_histogram(plan: Plan) -> list[dict]:
    """How many KV heads use each ``(alpha, beta)`` rule, most used first."""
    counts = Counter(tuple(rule) for _, row in plan.layer_rules() for rule in row)
    return [{"alpha": a, "beta": b, "kv_heads": n} for (a, b), n in counts.most_common()]


def banner(report: PlanReport) -> str:
    """The lines ``moa-vllm serve`` prints before it starts the server."""
    lines = [
        f"MoA plan: {report.source} (from {report.how}; {report.provenance.method}, "
        f"elastic={report.elastic}, {report.sink_tokens} sinks, "
        + (f"granule {report.granule}, " if report.granule > 1 else "")
        + (f"exact up to {report.exact_floor} tokens, " if report.exact_floor else "") +
        f"{len(report.head_classes)} head classes of {len(report.head_classes[0].kv_heads)} "
        "KV heads)",
    ]
    if report.model.windowed_layers:
        lines.append(f"  MoA serves the {len(report.model.full_layers)} full-attention layers; "
                     f"the model windows {len(report.model.windowed_layers)} layers itself "
                     f"({report.model.sliding_window} tokens)")
    lines += [
        f"  at {d.length:>6} tokens: average density {d.average_density:.3f}, "
        f"allocated density {d.allocated_density:.3f}"
        + (f", whole cache {d.model_density:.3f} of the model's own"
           if report.model.windowed_layers else "")
        + f" (block size {report.block_size})"
        for d in report.densities
    ]
    return "\n".join(lines)
