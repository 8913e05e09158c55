"""The MoA attention backend as vLLM sees it (``--attention-backend moa``)."""

from __future__ import annotations

import functools
import json
from typing import ClassVar

import torch

from moa_vllm.plan import Plan
from moa_vllm.span_classes import SpanClass, assign_span_classes, class_of_layer
from moa_vllm.vllm_surface import (
    BACKEND_NAME,
    AttentionBackend,
    AttentionType,
    FullAttentionSpec,
    MultipleOf,
    VllmConfig,
    active_plan_entry,
    install_layer_spec_hook,
)


class MoaAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        from moa_vllm.impl import MoaAttentionImpl

        install_layer_spec_hook()
        return MoaAttentionImpl

    @staticmethod
    def get_builder_cls():
        from moa_vllm.metadata import MoaAttentionMetadataBuilder

        return MoaAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(16)]

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size % 16 == 0 and 32 <= head_size <= 256

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_rswa(cls) -> bool:
        # Prompt-elastic plans borrow R-SWA's per-request prompt lengths.
        return True


@functools.cache
def _plan_from_json(plan_json: str) -> tuple[Plan, tuple[SpanClass, ...]]:
    plan = Plan.model_validate_json(plan_json)
    return plan, tuple(assign_span_classes(plan))


def runtime_plan(vllm_config: VllmConfig | None = None) -> tuple[Plan, tuple[SpanClass, ...]]:
    """The plan the engine serves and its span classes (parsed once per process)."""
    entry = active_plan_entry(vllm_config)
    return _plan_from_json(json.dumps(entry["plan"], sort_keys=True))


def layer_kv_cache_spec(
    spec: FullAttentionSpec, layer: int, vllm_config: VllmConfig
) -> FullAttentionSpec:
    from moa_vllm.kv_cache import MoaSpanSpec

    _, classes = runtime_plan(vllm_config)
    return MoaSpanSpec.for_layer(spec, class_of_layer(list(classes), layer))
