"""vLLM's attention-backend interface, which our engine implements, and our backend's
place in it: its name and import path, its member of vLLM's backend enum, and our
entry in ``additional_config``.

vLLM files (relative to the ``vllm`` package):
- ``v1/attention/backend.py``: the backend, impl, metadata-builder and layer
  interfaces; ``CommonAttentionMetadata.rswa_prefix_lens`` (per-request prompt
  lengths, see ``config.request_prompt_lengths``).
- ``v1/attention/backends/registry.py``: ``register_backend`` adds a member to
  ``AttentionBackendEnum``; members pickle by value, so ours pickles as a call to
  ``backend_member`` (spawned workers unpickle the config before plugins load).
- ``v1/kv_cache_interface.py``: the KV-cache specs; ``FullAttentionSpec.max_memory_usage_bytes``
  is the start-up check that one request fits, and the "maximum concurrency" log.
- ``v1/core/single_type_kv_cache_manager.py``: ``FullAttentionManager``, the manager
  ``engine/kv_cache.py`` extends (its internals: ``kv_manager``).
"""

from __future__ import annotations

from vllm.config import VllmConfig, get_current_vllm_config  # noqa: F401  (re-exported)
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
from vllm.v1.kv_cache_interface import (  # noqa: F401
    AttentionSpec,
    FullAttentionSpec,
    SlidingWindowSpec,
)

logger = init_logger("vllm.moa")  # under vLLM's logging configuration

BACKEND_NAME = "MOA"
BACKEND_PATH = "moa_vllm.engine.backend.MoaAttentionBackend"
CONFIG_KEY = "moa"  # our entry in VllmConfig.additional_config


def backend_member() -> AttentionBackendEnum:
    """The ``MOA`` member of vLLM's backend enum, registered on first use."""
    member = AttentionBackendEnum._member_map_.get(BACKEND_NAME)
    if member is None:
        register_backend(BACKEND_NAME, BACKEND_PATH)
        member = AttentionBackendEnum[BACKEND_NAME]
        member.__reduce_ex__ = lambda protocol: (backend_member, ())
    return member


def moa_requested(vllm_config: VllmConfig) -> bool:
    return vllm_config.attention_config.backend is backend_member()
