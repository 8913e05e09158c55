"""Random paged caches, plans and the oracle comparison for the kernel tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moa_vllm.oracle import paged_span_attention_reference
from moa_vllm.span_mask import BETA_SCALE, LayerSpans, SpanParams

from moa_kernels import span_attention_paged


@dataclass
class Case:
    query: torch.Tensor
    kv_cache: torch.Tensor
    block_table: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    prompt_lens: torch.Tensor
    spans: LayerSpans
    scale: float
    max_query_len: int
    max_seq_len: int


def make_case(
    seq_lens: list[int],
    query_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int = 16,
    rules: list[tuple[int, float]] | None = None,
    sink_tokens: int = 4,
    min_window: int = 1,
    granule: int = 1,
    exact_floor: int = 0,
    elastic: str = "position",
    prompt_lens: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
    transposed: bool = False,
    device: str = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
) -> Case:
    """A batch laid out like vLLM's: shuffled block tables, random cache (also in
    the unused blocks), CPU-style non-contiguous layout when ``transposed``."""
    g = torch.Generator().manual_seed(seed)
    assert len(seq_lens) == len(query_lens)
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=g)
    block_table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for i, nb in enumerate(blocks_per_seq):
        block_table[i, :nb] = perm[used : used + nb].to(torch.int32)
        # stale entries past the sequence: point at someone else's block
        block_table[i, nb:] = perm[(used + nb) % num_blocks].to(torch.int32)
        used += nb
    shape = (num_blocks, num_kv_heads, block_size, 2 * head_size)
    if transposed:
        kv = torch.randn(num_blocks, block_size, num_kv_heads, 2 * head_size, generator=g)
        kv_cache = kv.to(dtype).transpose(1, 2)
    else:
        kv_cache = torch.randn(shape, generator=g).to(dtype)
    assert kv_cache.shape == shape
    total = sum(query_lens)
    query = torch.randn(total, num_heads, head_size, generator=g).to(dtype)
    qsl = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(query_lens), 0)
    if rules is None:
        rules = [(8, 0.25)] * num_kv_heads
    assert len(rules) == num_kv_heads
    spans = LayerSpans(
        alpha=torch.tensor([a for a, _ in rules], dtype=torch.int32),
        beta_q=torch.tensor([int(round(b * BETA_SCALE)) for _, b in rules], dtype=torch.int32),
        params=SpanParams(sink_tokens, min_window, elastic, granule, exact_floor),
    )
    if prompt_lens is None:
        prompt_lens = [s - q for s, q in zip(seq_lens, query_lens)]
        prompt_lens = [p if p > 0 else s for p, s in zip(prompt_lens, seq_lens)]
    return Case(
        query=query.to(device),
        kv_cache=kv_cache.to(device) if not transposed else kv_cache.transpose(1, 2).to(device).transpose(1, 2),
        block_table=block_table.to(device),
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        prompt_lens=torch.tensor(prompt_lens, dtype=torch.int32, device=device),
        spans=spans.to(device),
        scale=head_size**-0.5,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )


def run_kernel(case: Case, out: torch.Tensor | None = None, **kw) -> torch.Tensor:
    if out is None:
        out = torch.full_like(case.query, float("nan"))  # poison: every row must be written
    params = case.spans.params
    span_attention_paged(
        case.query, case.kv_cache, case.block_table, case.query_start_loc, case.seq_lens,
        case.spans.alpha, case.spans.beta_q, params.sink_tokens, params.min_window,
        params.elastic == "position",
        case.prompt_lens if params.elastic == "prompt" else None,
        case.scale, out, case.max_query_len, case.max_seq_len, granule=params.granule,
        exact_floor=params.exact_floor, **kw,
    )
    return out


def reference(case: Case) -> torch.Tensor:
    return paged_span_attention_reference(
        case.query.cpu().float(), case.kv_cache.cpu().float(), case.block_table.cpu(),
        case.query_start_loc.cpu(), case.seq_lens.cpu(), case.spans.to("cpu"), case.scale,
        case.prompt_lens.cpu() if case.spans.params.elastic == "prompt" else None,
    )


TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 4e-2}


def assert_matches(case: Case, **kw) -> torch.Tensor:
    out = run_kernel(case, **kw)
    ref = reference(case)
    got = out.cpu().float()
    assert not torch.isnan(got).any(), "kernel left rows unwritten or produced NaN"
    err = (got - ref).abs().max().item()
    tol = TOL[case.query.dtype]
    assert err <= tol, f"max abs error {err:.3e} > {tol:.1e}"
    return got


def span_needed(case: Case) -> torch.Tensor:
    """Boolean [num_blocks, Hkv, block_size]: cache slots some query's span reads."""
    kv = case.kv_cache
    need = torch.zeros(kv.shape[:3], dtype=torch.bool)
    starts = case.query_start_loc.cpu().tolist()
    bt = case.block_table.cpu()
    bs = kv.shape[2]
    spans = case.spans.to("cpu")
    for i, seq_len in enumerate(case.seq_lens.cpu().tolist()):
        q_len = starts[i + 1] - starts[i]
        if q_len == 0:
            continue
        q_pos = torch.arange(seq_len - q_len, seq_len)
        k_pos = torch.arange(seq_len)
        if spans.params.elastic == "position":
            n = q_pos + 1
        else:
            n = torch.full_like(q_pos, int(case.prompt_lens[i]))
        m = spans.mask(q_pos, k_pos, n).any(dim=1)  # [Hkv, Tk]
        for h in range(m.shape[0]):
            pos = k_pos[m[h]]
            need[bt[i, pos // bs].long(), h, pos % bs] = True
    return need
