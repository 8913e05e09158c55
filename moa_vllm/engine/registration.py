"""vLLM general-plugin entry point (``vllm.general_plugins``: ``moa``): runs once
in every vLLM process, and is the one moment we register anything."""

from __future__ import annotations


def register() -> None:
    """Make ``--attention-backend moa`` available. Idempotent and cheap: nothing
    changes for engines that do not ask for MoA."""
    from moa_vllm.engine import vllm_surface
    from moa_vllm.engine.engine_plan import (
        EnginePlan,
        configure_engine,
        extra_slot_names,
        served_in_this_process,
    )
    from moa_vllm.engine.kv_cache import (
        MoaSpanManager,
        MoaSpanSpec,
        owns_cache_hits,
        span_cache_hit,
    )

    def spec_for_slot(spec, slot_name, vllm_config):
        return EnginePlan.from_config(vllm_config).spec_for_slot(
            spec, slot_name, vllm_surface.max_in_flight_tokens(vllm_config))

    vllm_surface.backend_member()
    vllm_surface.install_platform_hooks(configure_engine)
    vllm_surface.install_kv_slot_hooks(extra_slot_names, spec_for_slot)
    vllm_surface.register_kv_cache_spec(MoaSpanSpec, MoaSpanManager)
    vllm_surface.install_cache_hit_hook(owns_cache_hits, span_cache_hit)
    vllm_surface.install_endpoint_hook(_endpoint_plugin, served_in_this_process)


def _endpoint_plugin():
    from moa_vllm.serving.routes import MoaEndpointPlugin

    return MoaEndpointPlugin()
