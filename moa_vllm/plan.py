"""Plan format v1: one span rule ``(alpha, beta)`` per (layer, KV head).

A plan is a JSON document validated with pydantic. It names the model shape it
was made for (its fingerprint), the sink tokens, the elastic mode, the minimum
window, the rules and how it was made (provenance). Plans are per KV head (GQA
native): masking a KV position for a KV head masks it for all its query heads.

Hybrid models window some layers themselves (Gemma 3: five of every six). The
fingerprint lists those layers (``windowed_layers``, with the model's
``sliding_window``); their rows of ``rules`` (and ``head_classes``) are ``null``:
MoA serves the full-attention layers only, vLLM the windowed ones.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from moa_vllm.span_mask import ElasticMode, LayerSpans, SpanParams, quantize_beta

PLAN_FORMAT = "moa-plan"
PLAN_VERSION = 1


class PlanError(Exception):
    """A plan that cannot be used; the message says what is wrong and where.

    Not a ValueError on purpose: vLLM builds its config in pydantic validators,
    which would wrap a ValueError into a multi-line validation report."""


class ModelFingerprint(BaseModel):
    """The model shape a plan fits."""

    model_config = ConfigDict(extra="forbid")

    architecture: str
    num_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    windowed_layers: list[int] = Field(default_factory=list)
    """Layers the model windows itself (its own sliding window); MoA leaves them."""
    sliding_window: int | None = Field(default=None, gt=0)
    """The model's own window (tokens), when it has windowed layers."""

    @model_validator(mode="after")
    def _check_windowed(self) -> ModelFingerprint:
        layers = self.windowed_layers
        if layers != sorted(set(layers)) or any(not 0 <= i < self.num_layers for i in layers):
            raise ValueError(f"windowed_layers must be distinct increasing layer indices "
                             f"below {self.num_layers}, got {layers}")
        if bool(layers) != (self.sliding_window is not None):
            raise ValueError("windowed_layers and sliding_window go together")
        return self

    @property
    def full_layers(self) -> list[int]:
        """The layers MoA serves: those with full attention in the model."""
        windowed = set(self.windowed_layers)
        return [i for i in range(self.num_layers) if i not in windowed]

    def describe(self) -> str:
        hybrid = (f", {len(self.windowed_layers)} of them windowed to {self.sliding_window} "
                  "tokens by the model" if self.windowed_layers else "")
        return (
            f"{self.architecture} with {self.num_layers} layers{hybrid}, "
            f"{self.num_attention_heads} query / {self.num_kv_heads} KV heads, "
            f"head_dim {self.head_dim}, {self.max_position_embeddings} positions"
        )

    def shape_matches(self, other: ModelFingerprint) -> bool:
        """Same attention shape; the context length may differ (rules scale with N)."""
        keys = ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim",
                "windowed_layers", "sliding_window")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


class Provenance(BaseModel):
    """How a plan was made: enough to reproduce it."""

    method: str
    created: str
    tool: str = "moa-vllm"
    details: dict[str, Any] = Field(default_factory=dict)


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["moa-plan"] = PLAN_FORMAT
    version: int
    model: ModelFingerprint
    sink_tokens: int = Field(ge=0)
    elastic: ElasticMode
    min_window: int = Field(ge=1)
    granule: int = Field(default=1, ge=1)
    """Window starts are rounded down to multiples of this many tokens
    (``span_mask``); 1: token-exact, as every plan before it was."""
    exact_floor: int = Field(default=0, ge=0)
    """Every head reads every key while the elastic length is at most this many
    tokens (``span_mask``): short prompts stay exact. 0 (a plan without the field):
    the rules apply at every length."""
    max_head_classes: int = Field(default=4, ge=1, validation_alias=AliasChoices(
        "max_head_classes", "max_span_classes"))
    """Head classes (KV-cache groups) at most: the runtime uses the largest count
    that splits the KV heads evenly. (Plans written before the field's rename name
    it ``max_span_classes``.)"""
    rules: list[list[tuple[int, float]] | None]
    """``[layer][kv head]``; ``null`` for a layer the model windows itself."""
    head_classes: list[list[int] | None] | None = None
    """Optional class of every (layer, KV head), ``[layer][kv head]`` (``null``
    where ``rules`` is), classes ``0..k-1`` of equal sizes (the search writes one);
    without it the runtime derives one (``span_classes.head_class_assignment``)."""
    provenance: Provenance

    @model_validator(mode="after")
    def _check(self) -> Plan:
        if self.version != PLAN_VERSION:
            raise ValueError(
                f"unsupported plan version {self.version} "
                f"(this moa-vllm reads version {PLAN_VERSION})"
            )
        shape = (self.model.num_layers, self.model.num_kv_heads)
        _check_table("rules", self.rules, shape, self.model.windowed_layers)
        for layer, row in self.layer_rules():
            for head, (alpha, beta) in enumerate(row):
                if not (math.isfinite(beta) and 0.0 <= beta <= 1.0):
                    raise ValueError(
                        f"rules[{layer}][{head}]: beta must be a number in [0, 1], "
                        f"got {beta}"
                    )
        if self.sink_tokens % self.granule:
            raise ValueError(f"sink_tokens ({self.sink_tokens}) must be a multiple of the "
                             f"granule ({self.granule})")
        if self.exact_floor >= self.model.max_position_embeddings:
            raise ValueError(f"exact_floor ({self.exact_floor}) must be below the model's "
                             f"context ({self.model.max_position_embeddings}): at or above "
                             "it the plan is dense attention")
        if self.head_classes is not None:
            self._check_head_classes(shape)
        return self

    def _check_head_classes(self, shape: tuple[int, int]) -> None:
        rows = self.head_classes
        _check_table("head_classes", rows, shape, self.model.windowed_layers)
        sizes = Counter(c for row in rows if row is not None for c in row)
        if sorted(sizes) != list(range(len(sizes))):
            raise ValueError(f"head_classes must number the classes 0..{len(sizes) - 1}, "
                             f"got {sorted(sizes)}")
        if len(set(sizes.values())) != 1:
            raise ValueError("head_classes must have equal sizes (vLLM pads unequal "
                             f"KV-cache groups), got {dict(sorted(sizes.items()))}")

    # -- runtime views -------------------------------------------------------

    def layer_rules(self) -> list[tuple[int, list[tuple[int, float]]]]:
        """``(layer, rules)`` of every layer MoA serves (not the model-windowed ones)."""
        return [(layer, row) for layer, row in enumerate(self.rules) if row is not None]

    @property
    def span_params(self) -> SpanParams:
        return SpanParams(self.sink_tokens, self.min_window, self.elastic, self.granule,
                          self.exact_floor)

    def layer_spans(self, layer: int, kv_heads: slice | None = None) -> LayerSpans:
        """Rules of one layer as tensors; ``kv_heads`` selects a tensor-parallel slice."""
        if self.rules[layer] is None:
            raise ValueError(f"layer {layer} is windowed by the model: it has no MoA rules")
        row = self.rules[layer][kv_heads or slice(None)]
        return LayerSpans(
            alpha=torch.tensor([a for a, _ in row], dtype=torch.int32),
            beta_q=torch.tensor([quantize_beta(b) for _, b in row], dtype=torch.int32),
            params=self.span_params,
        )

    def mask_spans(self, layer: int) -> LayerSpans:
        """What each query of ``layer`` reads in the whole model under this plan: the
        layer's rules, or the model's own window where the model windows it (the
        torch references of the model: the oracle, the planner's masked forward)."""
        if self.rules[layer] is None:
            return LayerSpans.model_window(self.model.sliding_window, self.model.num_kv_heads)
        return self.layer_spans(layer)

    def to_json(self) -> str:
        """Indented JSON with one line per layer of rules and of head classes (plans
        are read by people)."""
        data = self.model_dump(mode="json")
        tables = {"rules": data.pop("rules")}
        if (assignment := data.pop("head_classes")) is not None:
            tables["head_classes"] = assignment
        head = json.dumps(data, indent=1)[:-2]
        for name, table in tables.items():
            rows = ",\n  ".join(json.dumps(row) for row in table)
            head += f',\n "{name}": [\n  {rows}\n ]'
        return head + "\n}\n"

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json())


def _check_table(name: str, rows: list, shape: tuple[int, int],
                 windowed_layers: list[int]) -> None:
    """``rows`` is ``[num_layers][num_kv_heads]``, ``null`` exactly at the windowed layers."""
    windowed = set(windowed_layers)
    if len(rows) != shape[0] or any(
            (row is None) != (layer in windowed) or (row is not None and len(row) != shape[1])
            for layer, row in enumerate(rows)):
        nulls = [layer for layer, row in enumerate(rows) if row is None]
        heads = sorted({len(r) for r in rows if r is not None})
        raise ValueError(
            f"{name} must be [num_layers={shape[0]}][num_kv_heads={shape[1]}] with null rows "
            f"exactly at the model's windowed layers {sorted(windowed)}, got {len(rows)} "
            f"layers with {heads} heads and null rows at {nulls}")


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def plan_from_dict(data: Any, source: str = "plan") -> Plan:
    """Validate a plan document; raises PlanError with one line naming the field.

    The MoA authors' per-query-head ``{"alphas", "betas"}`` format is not a plan of
    ours: ``moa-vllm plan import`` converts it once, with its provenance."""
    if not isinstance(data, dict):
        raise PlanError(f"{source}: a plan must be a JSON object")
    if "alphas" in data and "betas" in data and "rules" not in data:
        raise PlanError(f"{source}: the MoA authors' per-query-head format; convert it "
                        f"first: moa-vllm plan import {source} --model MODEL_DIR "
                        "--out plan.json")
    try:
        return Plan.model_validate(data)
    except ValidationError as err:
        raise PlanError(f"{source}: {_format_validation_error(err)}") from None


def load_plan(path: str | os.PathLike, model: ModelFingerprint | None = None) -> Plan:
    """The plan in ``path``; with ``model``, one that fits its shape."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise PlanError(f"{path}: cannot read plan ({err.strerror})") from None
    try:
        data = json.loads(text, parse_constant=lambda c: float(c))
    except json.JSONDecodeError as err:
        raise PlanError(f"{path}: not valid JSON ({err})") from None
    plan = plan_from_dict(data, str(path))
    if model is not None:
        check_plan_fits(plan, model, str(path))
    return plan


def fingerprint_from_hf_config(hf_config: Any) -> ModelFingerprint:
    """Fingerprint of a transformers config (the model directory's config.json)."""
    text_config = getattr(hf_config, "text_config", None) or hf_config
    num_heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // num_heads
    )
    archs = getattr(hf_config, "architectures", None) or ["unknown"]
    num_layers = text_config.num_hidden_layers
    window = getattr(text_config, "sliding_window", None)
    if window is not None and getattr(text_config, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(text_config, "layer_types", None) or ["sliding_attention"] * num_layers
    windowed = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    return ModelFingerprint(
        architecture=archs[0],
        num_layers=num_layers,
        num_attention_heads=num_heads,
        num_kv_heads=getattr(text_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        max_position_embeddings=text_config.max_position_embeddings,
        windowed_layers=windowed if window is not None else [],
        sliding_window=window if window is not None and windowed else None,
    )


def check_plan_fits(plan: Plan, model: ModelFingerprint, source: str) -> None:
    if not plan.model.shape_matches(model):
        raise PlanError(
            f"{source}: plan is for {plan.model.describe()}, "
            f"but the model is {model.describe()}"
        )


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def full_layer_rows(model: ModelFingerprint, row) -> list:
    """A ``[layer]`` table: ``row(layer)`` for the full-attention layers, ``None``
    for the ones the model windows itself."""
    windowed = set(model.windowed_layers)
    return [None if layer in windowed else row(layer) for layer in range(model.num_layers)]


def uniform_plan(
    model: ModelFingerprint,
    density: float,
    length: int | None = None,
    sink_tokens: int = 64,
    elastic: ElasticMode = "position",
    min_window: int = 64,
    grow: bool = False,
    granule: int = 1,
    exact_floor: int = 0,
) -> Plan:
    """StreamingLLM-style baseline: the same window for every head.

    Fixed window (default): sinks + window cover ``density`` of ``length`` tokens
    (a shorter input keeps more, a longer one less). ``grow=True``: the window
    grows with the elastic length (``alpha = -sink_tokens``, ``beta = density``),
    so sinks + window cover ``density`` at every length: the equal-density
    baseline for a MoA plan whose budget holds at several lengths."""
    if not 0.0 < density <= 1.0:
        raise PlanError(f"--density must be in (0, 1], got {density}")
    length = length or model.max_position_embeddings
    if density >= 1.0:
        rule, details = (model.max_position_embeddings, 0.0), {"density": 1.0}
    elif grow:
        rule, details = (-sink_tokens, density), {"density": density, "grow": True}
    else:
        window = max(min_window, math.ceil(density * length) - sink_tokens)
        rule, details = (window, 0.0), {"density": density, "length": length, "window": window}
    return Plan(
        version=PLAN_VERSION,
        model=model,
        sink_tokens=sink_tokens,
        elastic=elastic,
        min_window=min_window,
        granule=granule,
        exact_floor=exact_floor,
        rules=full_layer_rows(model, lambda layer: [rule] * model.num_kv_heads),
        provenance=Provenance(method="uniform", created=now_iso(), details=details),
    )
