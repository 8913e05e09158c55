"""vLLM's attention ops MoA calls: the CPU attention op (its ISA choice, KV writer,
work split and kernel), the CUDA KV writer, and the KV scales and fp8 element types
they use.

vLLM files (relative to the ``vllm`` package):
- ``v1/attention/backends/cpu_attn.py`` and ``_custom_ops.py``: the CPU op's ISA
  choice (``_get_attn_isa``), its writer ``cpu_attn_reshape_and_cache``, its
  ``cpu_attn_get_scheduler_metadata`` and ``cpu_attention_with_kv_cache`` (output
  must be contiguous; query may be a head slice); ``envs.VLLM_CPU_ATTN_SPLIT_KV``.
  The ``vec``/``vec16`` in-block layout is ``paged_kv.KVLayout.CPU_ATTN`` (a test
  writes with vLLM's writer and reads it back through ours).
- ``v1/attention/ops/triton_reshape_and_cache_flash.py``: the CUDA KV write; with
  an fp8 cache it stores every fp8 variant as ``current_platform.fp8_dtype()``
  (SM89+), the scales in the layer's ``_k_scale`` / ``_v_scale`` tensors.
"""

from __future__ import annotations

import torch

def reshape_and_cache_cuda(key, value, kv_cache, slot_mapping, kv_cache_dtype, layer):
    """vLLM's own KV write for its default layout (CUDA)."""
    from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (
        triton_reshape_and_cache_flash,
    )

    head_size = kv_cache.shape[-1] // 2
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    triton_reshape_and_cache_flash(
        key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
        layer._k_scale, layer._v_scale,
    )


CPU_ATTN_PLAIN_ISAS = ("vec", "vec16")  # the ISAs whose in-block layout paged_kv reads


def cpu_attention_isa(dtype: torch.dtype, block_size: int, head_size: int,
                      cache_dtype: str = "auto") -> str:
    """The ISA vLLM's CPU attention op runs (and lays its blocks out) for these.
    Raises NotImplementedError where vLLM's op cannot hold the cache dtype (fp8
    needs AVX-512 or AMX, and a head size divisible by 32)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size, cache_dtype)


def cpu_cache_refusal(dtype: torch.dtype, block_size: int, head_size: int,
                      cache_dtype: str) -> str | None:
    """Why vLLM's CPU op holds no ``cache_dtype`` KV cache for these on this CPU,
    in vLLM's words; None where it does."""
    try:
        cpu_attention_isa(dtype, block_size, head_size, cache_dtype)
    except NotImplementedError as err:
        return str(err)
    return None


def kv_scales(layer) -> tuple[float, float]:
    """The layer's K and V scales for a quantized KV cache (1.0 otherwise)."""
    return layer._k_scale_float, layer._v_scale_float


def kv_scale_tensors(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scales as the layer's one-element device tensors (what a kernel
    reads without a host sync)."""
    return layer._k_scale, layer._v_scale


FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
              "fp8_e5m2": torch.float8_e5m2}


def fp8_storage_dtype(cache_dtype: str, device: torch.device) -> torch.dtype:
    """The fp8 element type vLLM's writer stores for ``cache_dtype``: the CPU op
    the one named; on CUDA ``triton_reshape_and_cache_flash`` every fp8 variant
    as ``current_platform.fp8_dtype()`` (both allocate the bytes as uint8)."""
    if device.type == "cuda":
        from vllm.platforms import current_platform

        return current_platform.fp8_dtype()
    return FP8_DTYPES[cache_dtype]


def cuda_fp8_supported() -> bool:
    """vLLM's CUDA KV writer stores fp8 only on devices with native fp8 (SM89+)."""
    from vllm.platforms import current_platform

    return current_platform.has_device_capability(89)


def cpu_attn_write(key, value, key_cache, value_cache, slot_mapping, isa: str,
                   k_scale: float = 1.0, v_scale: float = 1.0,
                   cache_dtype: str = "auto") -> None:
    from vllm import _custom_ops as ops

    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, isa,
                                   k_scale=k_scale, v_scale=v_scale,
                                   kv_cache_dtype=cache_dtype)


def cpu_attn_schedule(num_reqs: int, num_heads: int, head_size: int, seq_lens, dtype,
                      query_start_loc, isa: str, num_kv_heads: int = 1,
                      cache_dtype: str = "auto") -> torch.Tensor:
    """The op's work split for one batch of causal attention (MoA: one KV head a call);
    it sizes the op's buffers by the cache dtype (fp8 caches need it said)."""
    from vllm import _custom_ops as ops
    from vllm import envs

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=num_reqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_size,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=query_start_loc, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        kv_cache_dtype=cache_dtype)


def cpu_attn_op(query, key_cache, value_cache, output, query_start_loc, seq_lens,
                block_table, scheduler_metadata, scale: float, k_scale: float = 1.0,
                v_scale: float = 1.0, cache_dtype: str = "auto") -> None:
    """Causal attention of a batch of query chunks, each over its own block table
    (prefill chunks and decode rows alike)."""
    from vllm import _custom_ops as ops

    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output,
        query_start_loc=query_start_loc, seq_lens=seq_lens, scale=scale, causal=True,
        alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0.0,
        scheduler_metadata=scheduler_metadata, s_aux=None, k_scale=k_scale,
        v_scale=v_scale, kv_cache_dtype=cache_dtype)
