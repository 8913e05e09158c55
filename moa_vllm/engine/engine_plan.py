"""The plan an engine serves: one typed record, resolved and validated once in the
front end, carried to every engine process in ``VllmConfig.additional_config``.

Input (``LLM(additional_config=...)`` or ``--additional-config``)::

    {"moa": {"plan": "/path/plan.json"}}      # optional; else plan discovery

After the front end has resolved it, the entry also holds ``"resolved"``: the
validated plan, where it came from and its digest. Every process parses a digest
once (``EnginePlan.from_config``), so two engines in one process may serve two
plans.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from moa_vllm.engine import stats, vllm_surface
from moa_vllm.engine.kv_cache import MoaSpanSpec
from moa_vllm.plan import Plan, PlanError, fingerprint_from_hf_config
from moa_vllm.plan_discovery import resolve_plan
from moa_vllm.span_classes import SpanClass, assign_span_classes, class_of_layer
from moa_vllm.span_mask import LayerSpans

logger = vllm_surface.logger


@dataclass(frozen=True)
class EnginePlan:
    plan: Plan
    source: str  # the plan file
    how: str  # which discovery rule found it

    @functools.cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.plan.model_dump_json().encode()).hexdigest()[:16]

    @functools.cached_property
    def span_classes(self) -> tuple[SpanClass, ...]:
        return tuple(assign_span_classes(self.plan))

    def spec_for_layer(self, spec, layer: int) -> MoaSpanSpec:
        """The KV-cache spec of one layer: its span class's."""
        return MoaSpanSpec.for_layer(spec, class_of_layer(list(self.span_classes), layer))

    def layer_spans(self, layer: int, kv_heads: slice | None = None) -> LayerSpans:
        return self.plan.layer_spans(layer, kv_heads)

    def to_config(self) -> dict:
        """The ``additional_config["moa"]`` entry that carries this record."""
        return {"plan": self.source,
                "resolved": {"plan": self.plan.model_dump(mode="json"), "source": self.source,
                             "how": self.how, "digest": self.digest}}

    @classmethod
    def from_config(cls, vllm_config=None) -> EnginePlan:
        """The record a config carries (validated once per digest and process)."""
        vllm_config = vllm_config or vllm_surface.get_current_vllm_config()
        entry = vllm_surface.moa_config_entry(vllm_config) or {}
        if "resolved" not in entry:  # a config that skipped the platform hook
            configure_engine(vllm_config)
            entry = vllm_surface.moa_config_entry(vllm_config)
        resolved = entry["resolved"]
        digest = resolved["digest"]
        if digest not in _RECORDS:
            _RECORDS[digest] = cls(Plan.model_validate(resolved["plan"]), resolved["source"],
                                   resolved["how"])
        return _RECORDS[digest]


_RECORDS: dict[str, EnginePlan] = {}  # digest -> record, this process's


def unsupported(vllm_config) -> list[str]:
    """What the model or the options ask of attention that MoA does not do, found
    before any engine process starts (the impl checks each layer again)."""
    model_config = vllm_config.model_config
    text_config = model_config.hf_text_config
    problems = []
    if (window := model_config.get_sliding_window()) is not None:
        problems.append(f"the model's own sliding window ({window} tokens; "
                        "--disable-sliding-window serves it with full attention, "
                        "capped at that length)")
    if getattr(text_config, "attn_logit_softcapping", None):
        problems.append("logits soft-capping")
    if vllm_config.cache_config.cache_dtype != "auto":
        problems.append(f"kv_cache_dtype={vllm_config.cache_config.cache_dtype} "
                        "(MoA keeps the KV cache in the model's dtype)")
    return problems


def configure_engine(vllm_config) -> None:
    """Resolve and validate the plan once, in the process that parses the
    arguments, and set the engine options MoA needs. Raises PlanError."""
    model_config = vllm_config.model_config
    if model_config is None or not vllm_surface.moa_requested(vllm_config):
        return
    entry = vllm_surface.moa_config_entry(vllm_config) or {}
    if "resolved" in entry:
        return  # already configured (vLLM re-validates copies of the config)
    if not isinstance(entry, dict) or set(entry) - {"plan"}:
        raise PlanError(f'additional_config["moa"] takes {{"plan": PATH}}, got {entry!r}')
    if problems := unsupported(vllm_config):
        raise PlanError(
            f"{model_config.model}: MoA attention does not support {'; '.join(problems)}"
        )
    fingerprint = fingerprint_from_hf_config(model_config.hf_config)
    resolved = resolve_plan(model_config.model, fingerprint, entry.get("plan"))
    record = EnginePlan(resolved.plan, resolved.source, resolved.how)
    plan = record.plan
    logger.info("MoA plan %s (from %s): %s, elastic=%s, sinks=%d", record.source,
                record.how, plan.provenance.method, plan.elastic, plan.sink_tokens)
    if plan.elastic == "prompt":
        if vllm_surface.disable_prefix_caching(vllm_config):
            logger.warning(
                "MoA: prefix caching is DISABLED because the plan uses "
                "elastic='prompt' (a token's KV then depends on the prompt length, "
                "so cached blocks are not reusable exactly). Use an "
                "elastic='position' plan to keep prefix caching."
            )
        vllm_surface.request_prompt_lengths(vllm_config)
    stats.ensure_stats_dir()  # engine processes started after this inherit it
    _RECORDS[record.digest] = record
    vllm_surface.set_moa_config_entry(vllm_config, record.to_config())
