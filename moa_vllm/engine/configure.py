"""Configuring an engine that asks for MoA, once, in the process that parses its
arguments (the platform's config hook): the plan resolved and validated, what MoA
does not support refused in one line, and the options MoA needs set on the
config: the KV block size, prefix caching and prompt lengths for prompt-elastic
plans, the served-plan record in ``additional_config``."""

from __future__ import annotations

from moa_vllm.engine import block_choice, stats
from moa_vllm.engine.engine_plan import EnginePlan
from moa_vllm.engine.vllm_surface.config import (
    moa_config_entry,
    request_prompt_lengths,
    set_moa_config_entry,
)
from moa_vllm.engine.vllm_surface.interface import logger, moa_requested
from moa_vllm.engine.vllm_surface.ops import cpu_cache_refusal, cuda_fp8_supported
from moa_vllm.plan import Plan, PlanError, fingerprint_from_hf_config
from moa_vllm.plan_discovery import prefix_caching_alternative, resolve_plan


_configured_here = False  # whether this process configured an engine that serves MoA


def served_in_this_process() -> bool:
    """Whether an engine configured in this process serves a MoA plan (the API
    server's front end configures its engine before it builds the app)."""
    return _configured_here


def unsupported(vllm_config) -> list[str]:
    """What the model or the options ask of attention that MoA does not do, found
    before any engine process starts (the impl checks each layer again)."""
    model_config = vllm_config.model_config
    text_config = model_config.hf_text_config
    problems = []
    fingerprint = fingerprint_from_hf_config(model_config.hf_config)
    if not fingerprint.full_layers:  # hybrid models: MoA serves the full layers
        problems.append(f"the model's own sliding window on every layer "
                        f"({fingerprint.sliding_window} tokens; --disable-sliding-window "
                        "serves it with full attention, capped at that length)")
    if getattr(text_config, "attn_logit_softcapping", None):
        problems.append("logits soft-capping")
    if (cache_dtype := vllm_config.cache_config.cache_dtype) != "auto":
        problems += quantized_cache_problems(vllm_config, cache_dtype)
    return problems


def quantized_cache_problems(vllm_config, cache_dtype: str) -> list[str]:
    """An fp8 KV cache runs where vLLM's writer stores it: on CUDA devices with
    native fp8 (MoA's kernel dequantizes on load), on CPUs where vLLM's op holds it."""
    device = vllm_config.device_config.device_type
    if device == "cuda":
        if cuda_fp8_supported():
            return []
        return [f"kv_cache_dtype={cache_dtype} on this GPU (vLLM's KV writer stores fp8 "
                "on compute capability 8.9 and above)"]
    if device != "cpu":
        return [f"kv_cache_dtype={cache_dtype} on {device} (MoA serves fp8 KV on CUDA and CPU)"]
    refusal = cpu_cache_refusal(vllm_config.model_config.dtype,
                                vllm_config.cache_config.block_size,
                                vllm_config.model_config.get_head_size(), cache_dtype)
    return [f"kv_cache_dtype={cache_dtype} on this CPU ({refusal})"] if refusal else []


def check_quantized_block_size(vllm_config, source: str) -> None:
    """vLLM's CPU op has no fp8 path for blocks of fewer than 32 tokens."""
    cache = vllm_config.cache_config
    if (cache.cache_dtype != "auto" and cache.block_size % 32
            and vllm_config.device_config.device_type == "cpu"):
        raise PlanError(f"{source}: an fp8 KV cache on CPU needs a KV block size that is a "
                        f"multiple of 32 (vLLM's op has no fp8 path below that), got "
                        f"{cache.block_size}; serve a plan whose granule is a multiple of 32")


def settle_block_size(vllm_config, plan: Plan, source: str, head_size: int) -> None:
    """The user's ``--block-size`` if it can serve the plan (else one line why not),
    or the one MoA picks (``block_choice.choose``), said in the start-up log. The
    platforms' own config hooks set the block size the same way (``platforms/cpu.py``
    sets 128); on CUDA the executor asks the backend's ``get_preferred_block_size``
    again, which answers the size set here."""
    device = vllm_config.device_config.device_type
    dtype = vllm_config.model_config.dtype
    block_size = vllm_config.cache_config.block_size
    if vllm_config.cache_config.user_specified_block_size:
        block_choice.check_user_choice(block_size, plan.granule, source)
        if device == "cpu" and (hint := block_choice.op_hint(dtype, block_size, head_size,
                                                             plan.granule)):
            logger.warning("MoA: %s", hint)
        return
    choice = block_choice.choose(device, dtype, head_size, plan.granule, block_size, source)
    vllm_config.cache_config.block_size = choice.size
    logger.info("MoA: KV block size %d (no --block-size given; vLLM's default here is %d): "
                "%s", choice.size, block_size, choice.why)


def configure_engine(vllm_config) -> None:
    """Resolve and validate the plan once, in the process that parses the
    arguments, and set the engine options MoA needs. Raises PlanError."""
    model_config = vllm_config.model_config
    if model_config is None or not moa_requested(vllm_config):
        return
    entry = moa_config_entry(vllm_config) or {}
    if "resolved" in entry:
        return  # already configured (vLLM re-validates copies of the config)
    if not isinstance(entry, dict) or set(entry) - {"plan"}:
        raise PlanError(f'additional_config["moa"] takes {{"plan": PATH}}, got {entry!r}')
    if problems := unsupported(vllm_config):
        raise PlanError(
            f"{model_config.model}: MoA attention does not support {'; '.join(problems)}"
        )
    fingerprint = fingerprint_from_hf_config(model_config.hf_config)
    resolved = resolve_plan(model_config.model, fingerprint, entry.get("plan"))
    record = EnginePlan(resolved.plan, resolved.source, resolved.how,
                        vllm_config.parallel_config.tensor_parallel_size)
    plan = record.plan
    settle_block_size(vllm_config, plan, record.source, fingerprint.head_dim)
    check_quantized_block_size(vllm_config, record.source)
    logger.info("MoA plan %s (from %s): %s, elastic=%s, sinks=%d, %d head classes of %d "
                "KV heads", record.source, record.how, plan.provenance.method,
                plan.elastic, plan.sink_tokens, len(record.head_classes),
                len(record.head_classes[0].kv_heads))
    if plan.elastic == "prompt":
        if vllm_config.cache_config.enable_prefix_caching:
            vllm_config.cache_config.enable_prefix_caching = False
            alternative = prefix_caching_alternative(fingerprint)
            logger.warning(
                "MoA: prefix caching is DISABLED because the plan uses "
                "elastic='prompt' (a token's KV then depends on the prompt length, "
                "so cached blocks are not reusable exactly). To keep prefix caching, "
                "serve %s", f"the shipped position-elastic plan: --additional-config "
                f"'{{\"moa\": {{\"plan\": \"{alternative}\"}}}}'" if alternative
                else "an elastic='position' plan (moa-vllm plan search --elastic position)")
        request_prompt_lengths(vllm_config)
    stats.ensure_stats_dir()  # engine processes started after this inherit it
    set_moa_config_entry(vllm_config, record.to_config())
    global _configured_here
    _configured_here = True
