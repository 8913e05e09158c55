"""The MoA attention backend as vLLM sees it (``--attention-backend moa``).

As vLLM's platforms each have their backend, an engine runs one attention
implementation, chosen once at start-up (``attention_path``): the Triton kernel
on CUDA, vLLM's own op on CPU where the plan allows, else the torch path. Its
impl and metadata builder carry only what that path reads.

vLLM imports it by the path ``vllm_surface.interface.BACKEND_PATH``: keep the two together."""

from __future__ import annotations

from typing import ClassVar

import torch

from moa_vllm import envs
from moa_vllm.engine.cpu_op import runs_on_op
from moa_vllm.engine.engine_plan import EnginePlan
from moa_vllm.engine.vllm_surface.interface import (
    BACKEND_NAME,
    AttentionBackend,
    AttentionType,
    MultipleOf,
    get_current_vllm_config,
)

TRITON, CPU_OP, TORCH = "triton", "cpu_op", "torch"  # the attention implementations
CHOICES = ("vllm", "torch", "triton")  # MOA_CPU_ATTN's values


def choose_path(device_type: str, dtype: torch.dtype, block_size: int, head_size: int,
                granule: int, cache_dtype: str = "auto") -> str:
    """``dtype``: the model's; ``cache_dtype``: vLLM's ``kv_cache_dtype``."""
    choice = envs.get(envs.MOA_CPU_ATTN)
    if choice not in CHOICES:
        raise ValueError(f"{envs.MOA_CPU_ATTN} must be one of {', '.join(CHOICES)}")
    if device_type == "cuda" or choice == "triton":
        return TRITON
    if choice == "vllm" and runs_on_op(dtype, block_size, head_size, granule, cache_dtype):
        return CPU_OP
    return TORCH


def attention_path(vllm_config) -> str:
    """The implementation this engine runs (its impl and builder ask alike)."""
    model, cache = vllm_config.model_config, vllm_config.cache_config
    return choose_path(vllm_config.device_config.device_type, model.dtype, cache.block_size,
                       model.get_head_size(), EnginePlan.from_config(vllm_config).plan.granule,
                       cache.cache_dtype)


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
        from moa_vllm.engine.impl import IMPLS  # built in the model's config context

        return IMPLS[attention_path(get_current_vllm_config())]

    @staticmethod
    def get_builder_cls():
        from moa_vllm.engine.metadata import BUILDERS

        return BUILDERS[attention_path(get_current_vllm_config())]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(16)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        # The size MoA settled on in the front end (configure.settle_block_size),
        # when vLLM asks again in the executor (CUDA).
        return get_current_vllm_config().cache_config.block_size

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

