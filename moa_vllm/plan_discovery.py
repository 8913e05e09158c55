"""Which plan serves a model: the plan the engine was handed
(``additional_config={"moa": {"plan": PATH}}``), then env ``MOA_PLAN``, then
``moa_plan.json`` in the model directory, then a shipped plan whose fingerprint
matches (``$MOA_PLANS_DIR``, then the plans packaged with moa-vllm)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from moa_vllm import envs
from moa_vllm.plan import (
    ModelFingerprint,
    Plan,
    PlanError,
    load_plan,
)
from moa_vllm.span_classes import average_density

PLAN_ENV = envs.MOA_PLAN
PLANS_DIR_ENV = envs.MOA_PLANS_DIR
MODEL_DIR_PLAN = "moa_plan.json"
# The elastic mode discovery serves first when both are shipped: position mode,
# which keeps vLLM's prefix caching on and exact. The SmolLM2 0.5 rules lose no
# more in position mode than in prompt mode on unseen validation samples
# (docs/serving.md#prefix-caching has the numbers).
DEFAULT_ELASTIC = "position"


@dataclass(frozen=True)
class ResolvedPlan:
    plan: Plan
    source: str  # path of the plan file
    how: str  # which discovery rule found it, and where the plan came from


def origin(plan: Plan) -> str:
    """Which model a plan was made on, when it says so (imported plans do): a
    fingerprint is a shape, which other models may share."""
    details = plan.provenance.details
    searched_on = (details.get("source") or {}).get("searched_on")
    if not searched_on:
        return ""
    label = details.get("label")
    return (f"; the MoA authors' plan searched on {searched_on}"
            + (f", {label}" if label else ""))


def _resolved(plan: Plan, source: str, how: str) -> ResolvedPlan:
    return ResolvedPlan(plan, source, how + origin(plan))


def packaged_plans_dir() -> Path:
    """The shipped plans: ``moa_vllm/plans`` in a wheel (mapped from the repo's
    top-level ``plans/``), the repo's ``plans/`` in an editable install."""
    packaged = Path(str(resources.files("moa_vllm"))) / "plans"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "plans"


def shipped_plans_dirs() -> list[Path]:
    dirs = []
    if env := envs.get(PLANS_DIR_ENV):
        dirs.append(Path(env))
    dirs.append(packaged_plans_dir())
    return [d for d in dirs if d.is_dir()]


def _shipped_candidates(model: ModelFingerprint) -> list[tuple[Path, Plan]]:
    found = []
    for d in shipped_plans_dirs():
        for path in sorted(d.glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if not isinstance(data, dict) or "rules" not in data:
                continue
            plan = load_plan(path)  # a broken shipped plan is an error, not a skip
            if plan.model.shape_matches(model) and (
                plan.model.architecture == model.architecture
            ):
                found.append((path, plan))
    return found


def _preference(candidate: tuple[Path, Plan]) -> tuple:
    """Of several matching shipped plans: searched before uniform, then the highest
    density budget (the safest for accuracy), then ``DEFAULT_ELASTIC``, then the
    search's validation score (``excess_vs_uniform``, or ``loss_vs_uniform`` where a
    plan carries that one), then the name."""

    path, plan = candidate
    details = plan.provenance.details
    budget = details.get("density") or average_density(plan, plan.model.max_position_embeddings)
    validation = details.get("validation") or {}
    loss = validation.get("excess_vs_uniform", validation.get("loss_vs_uniform"))
    return (plan.provenance.method != "moa-search", -round(float(budget), 4),
            plan.elastic != DEFAULT_ELASTIC, float("inf") if loss is None else float(loss),
            path.name)


def prefix_caching_alternative(model: ModelFingerprint) -> Path | None:
    """The shipped position-elastic plan discovery would prefer for this model (it
    keeps prefix caching), if there is one."""
    candidates = [c for c in _shipped_candidates(model) if c[1].elastic == "position"]
    return min(candidates, key=_preference)[0] if candidates else None


def resolve_plan(model_dir: str | os.PathLike | None, model: ModelFingerprint,
                 requested: str | os.PathLike | None = None) -> ResolvedPlan:
    """Find the plan for a model, or raise PlanError naming what was looked at.
    ``requested``: the plan the engine was handed in its ``additional_config``."""
    if requested:
        plan = load_plan(requested, model)
        return _resolved(plan, str(requested), "additional_config")
    if env := envs.get(PLAN_ENV):
        plan = load_plan(env, model)
        return _resolved(plan, env, f"${PLAN_ENV}")
    if model_dir is not None:
        local = Path(model_dir) / MODEL_DIR_PLAN
        if local.is_file():
            plan = load_plan(local, model)
            return _resolved(plan, str(local), "model directory")
    candidates = _shipped_candidates(model)
    if candidates:
        (path, plan), *others = sorted(candidates, key=_preference)
        how = "shipped plans (fingerprint match)"
        if others:
            how += "; also matching: " + ", ".join(p.name for p, _ in others)
        return _resolved(plan, str(path), how)
    looked = ", ".join(str(d) for d in shipped_plans_dirs()) or "no plans directory"
    raise PlanError(
        f"no MoA plan for {model.describe()}: set {PLAN_ENV}=path, put "
        f"{MODEL_DIR_PLAN} in the model directory, or add a matching plan to "
        f"plans/ (looked in: {looked}). Make one with `moa-vllm plan uniform "
        f"--model DIR --density 0.5 --out plan.json`."
    )
