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
    from moa_vllm.engine import vllm_surface
    from moa_vllm.engine.configure import configure_engine, served_in_this_process
    from moa_vllm.engine.engine_plan import EnginePlan
    from moa_vllm.engine.kv_cache import (
        MoaSpanManager,
        MoaSpanSpec,
        owns_cache_hits,
        span_cache_hit,
    )

    vllm_surface.backend_member()
    if refusal := compatibility_refusal():
        vllm_surface.install_refusal(refusal)
        return

    def spec_for_kv_head(spec, kv_head_name, vllm_config):
        return EnginePlan.from_config(vllm_config).spec_for_kv_head(
            spec, kv_head_name, vllm_config.max_in_flight_tokens)

    vllm_surface.install_platform_hooks(configure_engine)
    vllm_surface.install_kv_head_hooks(vllm_surface.extra_kv_head_layers, spec_for_kv_head)
    vllm_surface.register_kv_cache_spec(MoaSpanSpec, MoaSpanManager)
    vllm_surface.install_cache_hit_hook(owns_cache_hits, span_cache_hit)
    vllm_surface.install_endpoint_hook(_endpoint_plugin, served_in_this_process)


def compatibility_refusal() -> str | None:
    """Why MoA cannot serve on the installed vLLM (one line), or None. A release
    outside the supported range is tried when ``MOA_ALLOW_UNTESTED_VLLM=1``, with a
    warning; moved internals are refused on every release."""
    from moa_vllm import envs
    from moa_vllm.engine import vllm_contacts, vllm_surface

    version = vllm_contacts.installed_version()
    if problems := vllm_contacts.contact_problems(on_cpu=vllm_surface.on_cpu_platform()):
        return f"moa-vllm cannot serve on vLLM {version}: " + "; ".join(problems)
    refusal = vllm_contacts.version_refusal(version)
    if refusal and envs.get(envs.MOA_ALLOW_UNTESTED_VLLM) == "1":
        vllm_surface.logger.warning("%s; trying it (%s=1)", refusal,
                                    envs.MOA_ALLOW_UNTESTED_VLLM)
        return None
    return refusal and f"{refusal}; set {envs.MOA_ALLOW_UNTESTED_VLLM}=1 to try it anyway"


def _endpoint_plugin():
    from moa_vllm.serving.routes import MoaEndpointPlugin

    return MoaEndpointPlugin()
