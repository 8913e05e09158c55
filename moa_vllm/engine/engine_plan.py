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
import json
from dataclasses import dataclass

from moa_vllm.engine import block_choice, stats, vllm_surface
from moa_vllm.engine.kv_cache import MoaSpanSpec
from moa_vllm.plan import Plan, PlanError, fingerprint_from_hf_config
from moa_vllm.plan_discovery import prefix_caching_alternative, resolve_plan
from moa_vllm.plan_report import PlanReport, plan_report
from moa_vllm.span_classes import (
    HeadClass,
    Slot,
    head_class_assignment,
    head_classes,
    local_kv_heads,
    rank_kv_heads,
)
from moa_vllm.span_mask import LayerSpans

logger = vllm_surface.logger

SLOT_SUFFIX = ".moa_kv"  # KV head j >= 1 of layer L is the KV-cache layer "L.moa_kv<j>"


def slot_layer_name(layer_name: str, local_head: int) -> str:
    """The KV-cache layer that holds one local KV head of an attention layer."""
    return layer_name if local_head == 0 else f"{layer_name}{SLOT_SUFFIX}{local_head}"


def slot_of(slot_name: str) -> Slot:
    """(layer index, local KV head) of a KV-cache layer name."""
    layer_name, _, head = slot_name.partition(SLOT_SUFFIX)
    return vllm_surface.layer_index(layer_name), int(head or 0)


def extra_slot_names(layer_name: str, num_local_kv_heads: int) -> list[str]:
    return [slot_layer_name(layer_name, j) for j in range(1, num_local_kv_heads)]


@dataclass(frozen=True)
class EnginePlan:
    plan: Plan
    source: str  # the plan file
    how: str  # which discovery rule found it
    tp_size: int = 1
    assignment: tuple[tuple[int, ...], ...] | None = None
    """Head class of every (layer, local KV head) slot; derived once, in the front end."""

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

    def class_of(self, slot_name: str) -> HeadClass:
        layer, head = slot_of(slot_name)
        return self.head_classes[self.assignment[layer][head]]

    def spec_for_slot(self, spec, slot_name: str, in_flight_tokens: int) -> MoaSpanSpec:
        """The KV-cache spec of one slot: one KV head's page, in its head class."""
        return MoaSpanSpec.for_slot(spec, self.class_of(slot_name).index,
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
                                   resolved["how"], resolved["tp_size"],
                                   tuple(map(tuple, resolved["head_classes"])))
        return _RECORDS[digest]


_RECORDS: dict[str, EnginePlan] = {}  # digest -> record, this process's


def served_plan(vllm_config) -> EnginePlan | None:
    """The plan a configured engine serves; None for an engine without MoA."""
    entry = vllm_surface.moa_config_entry(vllm_config) or {}
    return EnginePlan.from_config(vllm_config) if entry.get("resolved") else None


def served_in_this_process() -> bool:
    """Whether an engine configured in this process serves a MoA plan (the API
    server's front end configures its engine before it builds the app)."""
    return bool(_RECORDS)


def unsupported(vllm_config) -> list[str]:
    """What the model or the options ask of attention that MoA does not do, found
    before any engine process starts (the impl checks each layer again)."""
    model_config = vllm_config.model_config
    text_config = model_config.hf_text_config
    problems = []
    fingerprint = fingerprint_from_hf_config(model_config.hf_config)
    if not fingerprint.full_layers:  # hybrid models: MoA serves the full layers
        problems.append(f"the model's own sliding window on every layer "
                        f"({fingerprint.sliding_window} tokens; --disable-sliding-window "
                        "serves it with full attention, capped at that length)")
    if getattr(text_config, "attn_logit_softcapping", None):
        problems.append("logits soft-capping")
    if (cache_dtype := vllm_surface.kv_cache_dtype(vllm_config)) != "auto":
        problems += quantized_cache_problems(vllm_config, cache_dtype)
    return problems


def quantized_cache_problems(vllm_config, cache_dtype: str) -> list[str]:
    """An fp8 KV cache runs where vLLM's writer stores it: on CUDA devices with
    native fp8 (MoA's kernel dequantizes on load), on CPUs where vLLM's op holds it."""
    device = vllm_surface.device_type(vllm_config)
    if device == "cuda":
        if vllm_surface.cuda_fp8_supported():
            return []
        return [f"kv_cache_dtype={cache_dtype} on this GPU (vLLM's KV writer stores fp8 "
                "on compute capability 8.9 and above)"]
    if device != "cpu":
        return [f"kv_cache_dtype={cache_dtype} on {device} (MoA serves fp8 KV on CUDA and CPU)"]
    try:
        vllm_surface.cpu_attention_isa(vllm_surface.model_dtype(vllm_config),
                                       vllm_surface.kv_block_size(vllm_config),
                                       vllm_surface.head_size(vllm_config), cache_dtype)
    except NotImplementedError as err:
        return [f"kv_cache_dtype={cache_dtype} on this CPU ({err})"]
    return []


def check_quantized_block_size(vllm_config, source: str) -> None:
    """vLLM's CPU op has no fp8 path for blocks of fewer than 32 tokens."""
    block_size = vllm_surface.kv_block_size(vllm_config)
    if (vllm_surface.kv_cache_dtype(vllm_config) != "auto" and block_size % 32
            and vllm_surface.device_type(vllm_config) == "cpu"):
        raise PlanError(f"{source}: an fp8 KV cache on CPU needs a KV block size that is a "
                        f"multiple of 32 (vLLM's op has no fp8 path below that), got "
                        f"{block_size}; serve a plan whose granule is a multiple of 32")


def settle_block_size(vllm_config, plan: Plan, source: str, head_size: int) -> None:
    """The user's ``--block-size`` if it can serve the plan (else one line why not),
    or the one MoA picks (``block_choice.choose``), said in the start-up log."""
    device = vllm_surface.device_type(vllm_config)
    dtype = vllm_surface.model_dtype(vllm_config)
    block_size = vllm_surface.kv_block_size(vllm_config)
    if vllm_surface.user_chose_block_size(vllm_config):
        block_choice.check_user_choice(block_size, plan.granule, source)
        if device == "cpu" and (hint := block_choice.op_hint(dtype, block_size, head_size,
                                                             plan.granule)):
            logger.warning("MoA: %s", hint)
        return
    choice = block_choice.choose(device, dtype, head_size, plan.granule, block_size, source)
    vllm_surface.set_kv_block_size(vllm_config, choice.size)
    logger.info("MoA: KV block size %d (no --block-size given; vLLM's default here is %d): "
                "%s", choice.size, block_size, choice.why)


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
    record = EnginePlan(resolved.plan, resolved.source, resolved.how,
                        vllm_surface.tensor_parallel_size(vllm_config))
    plan = record.plan
    settle_block_size(vllm_config, plan, record.source, fingerprint.head_dim)
    check_quantized_block_size(vllm_config, record.source)
    logger.info("MoA plan %s (from %s): %s, elastic=%s, sinks=%d, %d head classes of %d "
                "(layer, KV head) slots", record.source, record.how, plan.provenance.method,
                plan.elastic, plan.sink_tokens, len(record.head_classes),
                len(record.head_classes[0].slots))
    if plan.elastic == "prompt":
        if vllm_surface.disable_prefix_caching(vllm_config):
            alternative = prefix_caching_alternative(fingerprint)
            logger.warning(
                "MoA: prefix caching is DISABLED because the plan uses "
                "elastic='prompt' (a token's KV then depends on the prompt length, "
                "so cached blocks are not reusable exactly). To keep prefix caching, "
                "serve %s", f"the shipped position-elastic plan: --additional-config "
                f"'{{\"moa\": {{\"plan\": \"{alternative}\"}}}}'" if alternative
                else "an elastic='position' plan (moa-vllm plan search --elastic position)")
        vllm_surface.request_prompt_lengths(vllm_config)
    stats.ensure_stats_dir()  # engine processes started after this inherit it
    _RECORDS[record.digest] = record
    vllm_surface.set_moa_config_entry(vllm_config, record.to_config())
