"""The MoA attention backend as vLLM sees it (``--attention-backend moa``).

vLLM imports it by the path ``vllm_surface.BACKEND_PATH``: keep the two together."""

from __future__ import annotations

from typing import ClassVar

import torch

from moa_vllm.engine.vllm_surface import (
    BACKEND_NAME,
    AttentionBackend,
    AttentionType,
    MultipleOf,
    get_current_vllm_config,
    kv_block_size,
)


class MoaAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls():
        from moa_vllm.engine.impl import MoaAttentionImpl

        return MoaAttentionImpl

    @staticmethod
    def get_builder_cls():
        from moa_vllm.engine.metadata import MoaAttentionMetadataBuilder

        return MoaAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(16)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        # The size MoA settled on in the front end (engine_plan.settle_block_size),
        # when vLLM asks again in the executor (CUDA).
        return kv_block_size(get_current_vllm_config())

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

