"""The patches: where MoA replaces or wraps a vLLM function. Each is idempotent,
installed once by ``moa_vllm.registration`` after ``contacts`` has checked the
shape of everything it touches (``contacts.CONTACTS`` lists each with its file and
the releases that exercised it). The KV-head layer patch lives with its naming in
``kv_heads``.

vLLM files (relative to the ``vllm`` package):
- ``platforms/interface.py``: ``Platform.check_and_update_config`` runs in the
  front end on the finished ``VllmConfig``: our plan is resolved there.
- ``platforms/cpu.py``: ``CpuPlatform.get_attn_backend_cls`` ignores the
  selected backend; we answer ours when asked for it. On every platform a layer
  with its own sliding window (``v1/attention/selector.py``
  ``AttentionSelectorConfig.has_sliding_window``; set per layer by
  ``Attention.__init__`` from ``per_layer_sliding_window``) is answered as if no
  backend were selected: hybrid models keep vLLM's backend, spec
  (``SlidingWindowSpec``) and manager on their windowed layers.
- ``v1/kv_cache_spec_registry.py``: ``KVCacheSpecRegistry.register`` (after
  ``_ensure_registered``, or the built-ins are skipped once it is non-empty).
- ``v1/core/kv_cache_coordinator.py``: ``UnitaryKVCacheCoordinator`` and
  ``HybridKVCacheCoordinator.find_longest_cache_hit`` (replaced for span groups:
  the hybrid one trims full-attention hits as if downward-closed);
  ``v1/core/block_pool.py``: ``get_cached_block``, ``null_block``, and
  ``free_blocks`` keeping a freed block's hash until ``get_new_blocks`` reuses it
  (so freed span blocks stay hits until evicted).
- ``plugins/__init__.py`` ``load_endpoint_plugins`` (looked up by
  ``attach_endpoint_plugins`` at app build time; loads nothing without
  ``VLLM_PLUGINS``); ``entrypoints/openai``: ``engine_client.vllm_config`` in an
  endpoint plugin.
"""

from __future__ import annotations

from collections.abc import Callable

from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from moa_vllm.engine.vllm_surface.interface import (
    BACKEND_NAME,
    BACKEND_PATH,
    FullAttentionSpec,
    VllmConfig,
    moa_requested,
)

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
