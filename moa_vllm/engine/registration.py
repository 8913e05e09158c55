"""vLLM general-plugin entry point (``vllm.general_plugins``: ``moa``): runs once
in every vLLM process, and is the one moment we register anything."""

from __future__ import annotations


def register() -> None:
    """Make ``--attention-backend moa`` available. Idempotent and cheap: nothing
    changes for engines that do not ask for MoA."""
    from moa_vllm.engine import vllm_surface
    from moa_vllm.engine.engine_plan import EnginePlan, configure_engine, extra_slot_names
    from moa_vllm.engine.kv_cache import MoaSpanManager, MoaSpanSpec

    def spec_for_slot(spec, slot_name, vllm_config):
        return EnginePlan.from_config(vllm_config).spec_for_slot(
            spec, slot_name, vllm_surface.max_in_flight_tokens(vllm_config))

    vllm_surface.backend_member()
    vllm_surface.install_platform_hooks(configure_engine)
    vllm_surface.install_kv_slot_hooks(extra_slot_names, spec_for_slot)
    vllm_surface.register_kv_cache_spec(MoaSpanSpec, MoaSpanManager)
