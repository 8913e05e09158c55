"""The plan an engine serves: one typed record, resolved and validated once in the
front end (``configure``), carried to every engine process in
``VllmConfig.additional_config``.

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
import json
from dataclasses import dataclass

from moa_vllm.engine.kv_cache import MoaSpanSpec
from moa_vllm.engine.vllm_surface.config import moa_config_entry
from moa_vllm.engine.vllm_surface.interface import get_current_vllm_config
from moa_vllm.engine.vllm_surface.kv_heads import kv_head_of
from moa_vllm.plan import Plan
from moa_vllm.plan_report import PlanReport, plan_report
from moa_vllm.span_classes import (
    HeadClass,
    head_class_assignment,
    head_classes,
    local_kv_heads,
    rank_kv_heads,
)
from moa_vllm.span_mask import LayerSpans

@dataclass(frozen=True)
class EnginePlan:
    plan: Plan
    source: str  # the plan file
    how: str  # which discovery rule found it
    tp_size: int = 1
    assignment: tuple[tuple[int, ...], ...] | None = None
    """Head class of every KV head (layer, local KV head); derived once, in the front end."""

    def __post_init__(self) -> None:
        if self.assignment is None:
            assignment = head_class_assignment(self.plan, self.tp_size)
            object.__setattr__(self, "assignment", tuple(map(tuple, assignment)))

    @functools.cached_property
    def digest(self) -> str:
        key = {"plan": self.plan.model_dump(mode="json"), "tp": self.tp_size,
               "classes": self.assignment}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    @functools.cached_property
    def head_classes(self) -> tuple[HeadClass, ...]:
        return head_classes(self.plan, [list(r) for r in self.assignment], self.tp_size)

    @property
    def num_local_kv_heads(self) -> int:
        return local_kv_heads(self.plan.model.num_kv_heads, self.tp_size)

    def class_of(self, kv_head_name: str) -> HeadClass:
        layer, head = kv_head_of(kv_head_name)
        return self.head_classes[self.assignment[layer][head]]

    def spec_for_kv_head(self, spec, kv_head_name: str, in_flight_tokens: int) -> MoaSpanSpec:
        """The KV-cache spec of one KV-head layer: one KV head's page, in its head class."""
        return MoaSpanSpec.for_kv_head(spec, self.class_of(kv_head_name).index,
                                    self.head_classes, in_flight_tokens)

    def layer_spans(self, layer: int, rank: int) -> LayerSpans:
        """The rules of a layer's local KV heads on this tensor-parallel rank."""
        heads = rank_kv_heads(self.plan.model.num_kv_heads, self.tp_size, rank)
        return self.plan.layer_spans(layer, slice(heads.start, heads.stop))

    def report(self, block_size: int) -> PlanReport:
        """What ``/v1/moa/plan`` and ``moa-vllm serve``'s banner say: the plan at the
        engine's block size, in this engine's head classes."""
        return plan_report(self.plan, self.source, self.how, block_size,
                           classes=self.head_classes)

    def to_config(self) -> dict:
        """The ``additional_config["moa"]`` entry that carries this record."""
        return {"plan": self.source,
                "resolved": {"plan": self.plan.model_dump(mode="json"), "source": self.source,
                             "how": self.how, "tp_size": self.tp_size,
                             "head_classes": [list(r) for r in self.assignment],
                             "digest": self.digest}}

    @classmethod
    def from_config(cls, vllm_config=None) -> EnginePlan:
        """The record a configured engine's config carries (``configure``: the
        platform hook), parsed once per digest and process."""
        vllm_config = vllm_config or get_current_vllm_config()
        entry = moa_config_entry(vllm_config) or {}
        if "resolved" not in entry:
            raise RuntimeError("MoA: this engine's config was not configured by MoA's "
                               "platform hook (attention backend 'moa' not selected?)")
        resolved = entry["resolved"]
        digest = resolved["digest"]
        if digest not in _RECORDS:
            _RECORDS[digest] = cls(Plan.model_validate(resolved["plan"]), resolved["source"],
                                   resolved["how"], resolved["tp_size"],
                                   tuple(map(tuple, resolved["head_classes"])))
        return _RECORDS[digest]


_RECORDS: dict[str, EnginePlan] = {}  # digest -> record parsed in this process


def served_plan(vllm_config) -> EnginePlan | None:
    """The plan a configured engine serves; None for an engine without MoA."""
    entry = moa_config_entry(vllm_config) or {}
    return EnginePlan.from_config(vllm_config) if entry.get("resolved") else None
