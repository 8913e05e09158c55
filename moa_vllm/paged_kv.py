"""vLLM's paged KV-cache layout as our kernels, torch path and oracle read it.

One layer's cache is the logical ``[num_blocks, num_kv_heads, block_size,
2 * head_size]`` view: K in the first half of the last dimension, V in the second.
"""

from __future__ import annotations

import torch


def gather_kv(
    kv_cache: torch.Tensor, block_row: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[len(positions), Hkv, D]`` of one request's token positions."""
    block_size = kv_cache.shape[2]
    head_size = kv_cache.shape[3] // 2
    blocks = block_row[positions // block_size].long()
    kv = kv_cache[blocks, :, positions % block_size]
    return kv[..., :head_size], kv[..., head_size:]
