"""The engine configuration MoA reads or sets beyond vLLM's public config fields
(those, ``cache_config.block_size`` and the like, are read where they are used).

vLLM files (relative to the ``vllm`` package):
- ``config/``: ``additional_config`` (ours under ``"moa"``),
  ``cache_config.enable_prefix_caching``, ``cache_config.block_size`` and
  ``user_specified_block_size`` (set by the platform hook unless the user chose;
  ``platforms/interface.py`` ``update_block_size_for_backend`` asks the backend's
  ``get_preferred_block_size`` again in the executor), ``compilation_config.cudagraph_mode``,
  ``scheduler_config.max_num_seqs``, ``VllmConfig.max_in_flight_tokens``.
- ``model_config.model_arch_config.rswa_window``: per-request prompt lengths reach
  the builders (``CommonAttentionMetadata.rswa_prefix_lens``) only when it is not None.
- ``distributed``: the tensor-parallel rank (the world size from the config).
"""

from __future__ import annotations

from moa_vllm.engine.vllm_surface.interface import CONFIG_KEY, VllmConfig

def moa_config_entry(vllm_config: VllmConfig) -> dict | None:
    extra = vllm_config.additional_config
    return extra.get(CONFIG_KEY) if isinstance(extra, dict) else None


def set_moa_config_entry(vllm_config: VllmConfig, entry: dict) -> None:
    extra = vllm_config.additional_config
    vllm_config.additional_config = {**(extra if isinstance(extra, dict) else {}),
                                     CONFIG_KEY: entry}


def request_prompt_lengths(vllm_config: VllmConfig) -> None:
    """Have the model runner hand per-request prompt lengths to attention builders
    (it does so only for R-SWA models: ``rswa_window`` not None)."""
    vllm_config.model_config.model_arch_config.rswa_window = 0


def full_decode_graphs(vllm_config: VllmConfig) -> bool:
    """Whether decode steps may replay as full CUDA graphs (vLLM resolves the mode
    after the builders exist, so ask at build time)."""
    from vllm.config import CUDAGraphMode

    mode = vllm_config.compilation_config.cudagraph_mode
    return mode is not None and mode.decode_mode() == CUDAGraphMode.FULL


def tensor_parallel_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()
