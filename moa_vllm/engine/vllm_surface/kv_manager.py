"""KV-cache manager and scheduler internals: a request's blocks in one KV-cache
group, freeing a range of them, and the bytes a request holds in the block pool.

vLLM files (relative to the ``vllm`` package):
- ``v1/core/single_type_kv_cache_manager.py``: ``FullAttentionManager`` and its
  ``req_to_blocks``, ``_remove_blocks_in_range``, ``_null_block``; the manager's
  ``remove_skipped_blocks`` and ``get_num_blocks_to_allocate`` (its
  ``apply_admission_cap`` / ``max_admission_blocks_per_request`` gate) are
  overridden in ``engine/kv_cache.py``.
- ``v1/core/sched/scheduler.py``, ``v1/core/kv_cache_manager.py``: the
  scheduler's ``kv_cache_config.kv_cache_groups`` (``layer_names``,
  ``kv_cache_spec.page_size_bytes``) in the order of
  ``kv_cache_manager.coordinator.single_type_managers`` (bytes a request holds);
  ``scheduler.requests`` keyed ``<added id>-<8 random chars>``
  (``v1/engine/input_processor.py``). ``v1/engine/core.py`` sets
  ``cache_config.num_gpu_blocks`` between ``get_kv_cache_configs`` and
  ``update_kv_cache_capacity``.
"""

from __future__ import annotations

from moa_vllm.engine.vllm_surface.interface import FullAttentionManager

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
