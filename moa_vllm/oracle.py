"""Torch reference of MoA attention over vLLM's paged KV cache.

Dense, fp32, and deliberately simple: every kernel and the engine backend are
tested against it (the cache layout: ``paged_kv``).
"""

from __future__ import annotations

import torch

from moa_vllm.paged_kv import gather_kv
from moa_vllm.span_mask import LayerSpans, elastic_lengths, masked_attention


def span_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    n: torch.Tensor,
    spans: LayerSpans,
    scale: float,
) -> torch.Tensor:
    """Masked attention of one request in fp32: q ``[Tq, H, D]``, k/v ``[Tk, Hkv, D]``."""
    allowed = spans.mask(q_pos, k_pos, n)  # [Hkv, Tq, Tk]
    return masked_attention(q.float(), k.float(), v.float(), allowed, scale)


def paged_span_attention_reference(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    spans: LayerSpans,
    scale: float,
    prompt_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output ``[T, H, D]`` (fp32) for a batch laid out like vLLM's varlen batches.

    Request ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]``,
    which are its last tokens: positions ``seq_lens[i] - q_len ... seq_lens[i]-1``.
    """
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q_rows = slice(starts[i], starts[i + 1])
        q_len = starts[i + 1] - starts[i]
        if q_len == 0:
            continue
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        k, v = gather_kv(kv_cache, block_table[i], k_pos)
        prompt_len = None if prompt_lens is None else int(prompt_lens[i])
        n = elastic_lengths(spans, q_pos, prompt_len)
        out[q_rows] = span_attention(query[q_rows], k, v, q_pos, k_pos, n, spans, scale)
    return out
