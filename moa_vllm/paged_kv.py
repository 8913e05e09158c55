"""vLLM's paged KV-cache layouts as our kernels, torch path and oracle read them.

One layer's (one KV head's, under MoA) cache is a ``[num_blocks, num_kv_heads, block_size,
2 * head_size]`` tensor; what lies inside a block depends on who writes it:

- ``TOKEN_ROWS``: one row per token, K in the first half, V in the second
  (vLLM's flash layout: CUDA, and our own writer on CPU ISAs we do not read).
- ``CPU_ATTN``: vLLM's CPU attention op's ``vec``/``vec16`` blocks (written by
  ``cpu_attn_reshape_and_cache``): all of K transposed (``[head_size,
  block_size]``), then all of V (``[block_size, head_size]``). Attention then
  runs on vLLM's own op; our torch path reads the same blocks through ``kv_views``.
"""

from __future__ import annotations

import enum

import torch


class KVLayout(enum.Enum):
    TOKEN_ROWS = "token_rows"
    CPU_ATTN = "cpu_attn"


def kv_views(kv_cache: torch.Tensor, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V, each a ``[num_blocks, num_kv_heads, block_size, head_size]`` view."""
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    head_size = two_d // 2
    if layout is KVLayout.TOKEN_ROWS:
        return kv_cache[..., :head_size], kv_cache[..., head_size:]
    halves = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head_size)
    k = halves[:, :, 0].view(num_blocks, num_kv_heads, head_size, block_size).transpose(2, 3)
    v = halves[:, :, 1].view(num_blocks, num_kv_heads, block_size, head_size)
    return k, v


def cpu_attn_halves(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V regions of every block as vLLM's CPU op and writer take them."""
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    return kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)


def gather_kv(
    kv_cache: torch.Tensor, block_row: torch.Tensor, positions: torch.Tensor,
    layout: KVLayout = KVLayout.TOKEN_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[len(positions), Hkv, D]`` of one request's token positions."""
    block_size = kv_cache.shape[2]
    blocks = block_row[positions // block_size].long()
    offsets = positions % block_size
    k, v = kv_views(kv_cache, layout)
    return k[blocks, :, offsets], v[blocks, :, offsets]


def compact_block_tables(
    block_table: torch.Tensor, seq_lens: torch.Tensor, first_keys: torch.Tensor,
    sink_tokens: int, block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables and lengths that list only the sinks and the keys from
    ``first_keys`` on (``[R, B]``, block-aligned, at least ``sink_tokens``): a dense
    op over them reads exactly those keys, in order. ``block_table`` ``[B, W]``,
    ``seq_lens`` ``[B]`` -> tables ``[R, B, W]`` int32 (the tail unused), lengths
    ``[R, B]`` int32."""
    width = block_table.shape[1]
    sink_blocks = sink_tokens // block_size
    j = torch.arange(width, device=block_table.device)
    first_block = (first_keys // block_size).to(torch.int64)[..., None]
    index = torch.where(j < sink_blocks, j, j - sink_blocks + first_block).clamp_(max=width - 1)
    rows = block_table[None].expand(first_keys.shape[0], -1, -1)
    tables = torch.gather(rows, 2, index).to(torch.int32)
    lens = (seq_lens[None].to(torch.int64) - first_keys + sink_tokens).to(torch.int32)
    return tables, lens
