"""One KV-cache layer per KV head. A KV head is one (layer, local KV head) pair; its
KV-head layer holds its cache, so that vLLM gives it its own spec, KV tensor,
KV-cache group and slot mapping. The layer (a patch of ``Attention``), its naming
and its lookups live here together. ("Slot", as in ``slot_mapping``, is vLLM's: a
token's place in the cache.)

vLLM files (relative to the ``vllm`` package):
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
- A windowed layer's spec block size is the layer's own choice
  (``Attention.get_kv_cache_spec``); pages of unequal sizes are unified by growing
  the smaller pages' block size (``v1/core/kv_cache_utils.py``
  ``unify_kv_cache_spec_page_size``), so a windowed layer of several KV heads takes
  fewer tokens per block to keep MoA's one-head KV-head layers at MoA's block size.
- ``v1/core/kv_cache_utils.py``: specs that do not merge form buckets, each split
  into groups of the smallest bucket's size, padded otherwise: our classes have
  equal sizes, and the builder checks its group is exactly one class. Under
  pipeline parallelism (``parallel_config.pipeline_parallel_size``) the groups are
  the whole model's, projected onto each stage's layers
  (``_project_kv_cache_groups_to_worker``): a stage's group is the class's KV heads
  on that stage.
- ``model_executor/models/utils.py``: ``extract_layer_index``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from moa_vllm.engine.vllm_surface.interface import (
    BACKEND_NAME,
    FullAttentionSpec,
    SlidingWindowSpec,
    VllmConfig,
    get_current_vllm_config,
    moa_requested,
)

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
