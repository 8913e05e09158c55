"""MoA routes on vLLM's OpenAI server: ``GET /v1/moa/plan``, and MoA figures on
vLLM's ``/metrics``. A server that serves MoA attaches them when no ``VLLM_PLUGINS``
allowlist is set (``vllm_surface.patches.install_endpoint_hook``); with one, name
``moa-routes`` in it (``moa-vllm serve`` does)."""

from __future__ import annotations

import os

from fastapi import APIRouter, FastAPI, HTTPException, Request

from moa_vllm.plan import Plan, PlanError, load_plan
from moa_vllm.plan_report import PlanReport


def source_status(source: str, loaded: Plan) -> str:
    """Whether the plan file still holds the plan being served."""
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

        from moa_vllm.serving.metrics import MoaCollector

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
        from moa_vllm.engine.engine_plan import served_plan

        state.moa_plan_report = state.moa_plan = None
        if engine_client is None or (served := served_plan(engine_client.vllm_config)) is None:
            return
        state.moa_plan = served.plan
        state.moa_plan_report = served.report(engine_client.vllm_config.cache_config.block_size)
