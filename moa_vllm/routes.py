"""MoA routes on vLLM's OpenAI server (``vllm.endpoint_plugins``: allow-list it with
``VLLM_PLUGINS``; ``moa-vllm serve`` does): ``GET /v1/moa/plan``, and MoA figures
on vLLM's ``/metrics``."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from pydantic import BaseModel

from moa_vllm.plan import ModelFingerprint, Plan, Provenance

REPORT_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


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


def plan_report(entry: dict[str, Any], block_size: int) -> PlanReport:
    from moa_vllm.span_classes import allocated_density, assign_span_classes, average_density

    plan = Plan.model_validate(entry["plan"])
    lengths = [n for n in REPORT_LENGTHS if n <= plan.model.max_position_embeddings]
    return PlanReport(
        source=entry["source"],
        how=entry["how"],
        model=plan.model,
        provenance=plan.provenance,
        elastic=plan.elastic,
        sink_tokens=plan.sink_tokens,
        min_window=plan.min_window,
        span_classes=[list(c.layers) for c in assign_span_classes(plan)],
        block_size=block_size,
        densities=[
            DensityAt(length=n, average_density=average_density(plan, n),
                      allocated_density=allocated_density(plan, n, block_size))
            for n in lengths
        ],
    )


def source_status(source: str, loaded: Plan) -> str:
    """Whether the plan file still holds the plan being served."""
    from moa_vllm.plan import PlanError, load_plan

    def spans(plan: Plan) -> dict:
        return plan.model_dump(exclude={"provenance"})

    try:
        current = load_plan(source, loaded.model)
        return "unchanged" if spans(current) == spans(loaded) else "changed"
    except PlanError:
        return "missing" if not os.path.exists(source) else "changed"


def report_plan(request: Request) -> Plan:
    return request.app.state.moa_plan


class MoaEndpointPlugin:
    name = "moa-routes"
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        from prometheus_client import REGISTRY

        from moa_vllm.metrics import MoaCollector

        router = APIRouter()

        @router.get("/v1/moa/plan", response_model=PlanReport)
        async def get_plan(request: Request) -> PlanReport:
            report = getattr(request.app.state, "moa_plan_report", None)
            if report is None:
                raise HTTPException(404, "this server does not serve a MoA plan")
            return report.model_copy(
                update={"source_status": source_status(report.source, report_plan(request))}
            )

        app.include_router(router)
        if not getattr(REGISTRY, "_moa_registered", False):
            REGISTRY.register(MoaCollector())
            REGISTRY._moa_registered = True

    async def init_state(self, engine_client, state, args) -> None:
        from moa_vllm.vllm_surface import CONFIG_KEY

        state.moa_plan_report = state.moa_plan = None
        if engine_client is None:
            return
        config = engine_client.vllm_config
        extra = config.additional_config
        if isinstance(extra, dict) and CONFIG_KEY in extra:
            entry = extra[CONFIG_KEY]
            state.moa_plan = Plan.model_validate(entry["plan"])
            state.moa_plan_report = plan_report(entry, config.cache_config.block_size)
