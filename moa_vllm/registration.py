"""vLLM general-plugin entry point (``vllm.general_plugins``: ``moa``): runs once
in every vLLM process, and is the one moment we register anything. The plugin's
composition root: it wires the engine's hooks and the server's routes together, so
it sits above both (``tests/test_layout.py``)."""

from __future__ import annotations


def register() -> None:
    """Make ``--attention-backend moa`` available. Idempotent and cheap: nothing
    changes for engines that do not ask for MoA. On a vLLM outside the supported
    range, or one whose internals MoA touches have moved, nothing is patched and an
    engine that asks for MoA stops before it starts, with one line that says why."""
    from moa_vllm.engine.configure import configure_engine, served_in_this_process
    from moa_vllm.engine.engine_plan import EnginePlan
    from moa_vllm.engine.kv_cache import (
        MoaSpanManager,
        MoaSpanSpec,
        owns_cache_hits,
        span_cache_hit,
    )
    from moa_vllm.engine.vllm_surface import kv_heads, patches
    from moa_vllm.engine.vllm_surface.interface import backend_member

    backend_member()
    if refusal := compatibility_refusal():
        patches.install_refusal(refusal)
        return

    def spec_for_kv_head(spec, kv_head_name, vllm_config):
        return EnginePlan.from_config(vllm_config).spec_for_kv_head(
            spec, kv_head_name, vllm_config.max_in_flight_tokens)

    patches.install_platform_hooks(configure_engine)
    kv_heads.install_kv_head_hooks(kv_heads.extra_kv_head_layers, spec_for_kv_head)
    patches.register_kv_cache_spec(MoaSpanSpec, MoaSpanManager)
    patches.install_cache_hit_hook(owns_cache_hits, span_cache_hit)
    patches.install_endpoint_hook(_endpoint_plugin, served_in_this_process)


def compatibility_refusal() -> str | None:
    """Why MoA cannot serve on the installed vLLM (one line), or None. A release
    outside the supported range is tried when ``MOA_ALLOW_UNTESTED_VLLM=1``, with a
    warning; moved internals are refused on every release."""
    from moa_vllm import envs
    from moa_vllm.engine.vllm_surface import contacts
    from moa_vllm.engine.vllm_surface.interface import logger
    from moa_vllm.engine.vllm_surface.patches import on_cpu_platform

    version = contacts.installed_version()
    if problems := contacts.contact_problems(on_cpu=on_cpu_platform()):
        return f"moa-vllm cannot serve on vLLM {version}: " + "; ".join(problems)
    refusal = contacts.version_refusal(version)
    if refusal and envs.get(envs.MOA_ALLOW_UNTESTED_VLLM) == "1":
        logger.warning("%s; trying it (%s=1)", refusal,
                                    envs.MOA_ALLOW_UNTESTED_VLLM)
        return None
    return refusal and f"{refusal}; set {envs.MOA_ALLOW_UNTESTED_VLLM}=1 to try it anyway"


def _endpoint_plugin():
    from moa_vllm.serving.routes import MoaEndpointPlugin

    return MoaEndpointPlugin()
