"""Per-step attention metadata of the MoA backend and its builder."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moa_vllm.vllm_surface import (
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)


@dataclass
class MoaAttentionMetadata:
    """A varlen batch: request ``i`` owns query rows
    ``query_start_loc[i]:query_start_loc[i+1]``, its last tokens."""

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64, negative = padding
    prompt_lens: torch.Tensor | None  # [B] int32, elastic="prompt" only
    query_start_loc_cpu: torch.Tensor
    num_reqs: int


class MoaAttentionMetadataBuilder(AttentionMetadataBuilder[MoaAttentionMetadata]):
    """Gives every request its elastic N: positions follow from ``seq_lens`` and the
    query lengths; prompt lengths come from the runner (see ``vllm_surface``)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> MoaAttentionMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        prompt_lens = cm.rswa_prefix_lens
        if prompt_lens is not None:
            prompt_lens = prompt_lens[:num_reqs].to(
                device=cm.seq_lens.device, dtype=torch.int32, non_blocking=True
            )
        return MoaAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            max_seq_len=cm.max_seq_len,
            query_start_loc=cm.query_start_loc[: num_reqs + 1],
            seq_lens=cm.seq_lens[:num_reqs],
            block_table=cm.block_table_tensor[:num_reqs],
            slot_mapping=cm.slot_mapping,
            prompt_lens=prompt_lens,
            query_start_loc_cpu=cm.query_start_loc_cpu[: num_reqs + 1],
            num_reqs=num_reqs,
        )
