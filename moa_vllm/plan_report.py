"""The one density report of a plan: what its heads read (average density) and what
vLLM's block pool will hold (allocated density), at several lengths.

Used by ``plan show``, ``GET /v1/moa/plan``, ``serve``'s banner, the plan search's
provenance and the eval. Pydantic only: no server needed to print it.
"""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel

from moa_vllm.plan import ModelFingerprint, Plan, Provenance
from moa_vllm.span_classes import allocated_density, assign_span_classes, average_density

REPORT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
DEFAULT_BLOCK_SIZE = 16  # vLLM's default block size on CPU and CUDA


class DensityAt(BaseModel):
    length: int
    average_density: float
    allocated_density: float


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
    span_classes: list[list[int]]
    block_size: int
    densities: list[DensityAt]


def report_lengths(plan: Plan) -> list[int]:
    """The report's lengths up to the model's context, and the context itself."""
    context = plan.model.max_position_embeddings
    return sorted({*(n for n in REPORT_LENGTHS if n < context), context})


def density_table(plan: Plan, lengths: list[int], block_size: int) -> list[DensityAt]:
    return [DensityAt(length=n, average_density=average_density(plan, n),
                      allocated_density=allocated_density(plan, n, block_size))
            for n in lengths]


def plan_report(plan: Plan, source: str, how: str, block_size: int,
                lengths: list[int] | None = None) -> PlanReport:
    return PlanReport(
        source=source, how=how, model=plan.model, provenance=plan.provenance,
        elastic=plan.elastic, sink_tokens=plan.sink_tokens, min_window=plan.min_window,
        span_classes=[list(c.layers) for c in assign_span_classes(plan)],
        block_size=block_size,
        densities=density_table(plan, lengths or report_lengths(plan), block_size),
    )


def rule_histogram(plan: Plan) -> list[dict]:
    """How many KV heads use each ``(alpha, beta)`` rule, most used first."""
    counts = Counter(tuple(rule) for row in plan.rules for rule in row)
    return [{"alpha": a, "beta": b, "kv_heads": n} for (a, b), n in counts.most_common()]


def banner(report: PlanReport) -> str:
    """The lines ``moa-vllm serve`` prints before it starts the server."""
    lines = [
        f"MoA plan: {report.source} (from {report.how}; {report.provenance.method}, "
        f"elastic={report.elastic}, {report.sink_tokens} sinks, "
        f"{len(report.span_classes)} span classes)",
    ]
    lines += [
        f"  at {d.length:>6} tokens: average density {d.average_density:.3f}, "
        f"allocated density {d.allocated_density:.3f} (block size {report.block_size})"
        for d in report.densities
    ]
    return "\n".join(lines)
