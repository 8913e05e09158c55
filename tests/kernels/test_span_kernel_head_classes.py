"""Head classes: every KV head in its own one-head cache (views of one allocation,
uneven offsets) with its own shuffled block table from a stacked table; one launch
per layer must equal the oracle of the same data in the shared layout."""

from __future__ import annotations

import pytest
import torch
from _helpers import make_case, reference

from moa_kernels import span_attention_paged


def head_class_layout(case, head_tables: list[int], num_groups: int, seed: int = 1):
    """(head 0's cache view, int64 offsets, stacked tables) holding ``case``'s KV."""
    g = torch.Generator().manual_seed(seed)
    kv = case.kv_cache
    num_blocks, num_kv_heads, block_size, two_d = kv.shape
    page = num_blocks * block_size * two_d
    gaps = [int(x) for x in torch.randint(0, 3 * two_d, (num_kv_heads,), generator=g)]
    starts, pos = [], 0
    for h in range(num_kv_heads):
        pos += gaps[h]
        starts.append(pos)
        pos += page
    storage = torch.full((pos,), float("nan"), dtype=kv.dtype)
    tables = torch.randint(0, num_blocks, (num_groups, *case.block_table.shape),
                           generator=g, dtype=torch.int32)  # other groups: garbage
    for h in range(num_kv_heads):
        perm = torch.randperm(num_blocks, generator=g)
        view = storage[starts[h]:starts[h] + page].view(num_blocks, 1, block_size, two_d)
        view[perm] = kv[:, h:h + 1]
        tables[head_tables[h]] = perm[case.block_table.long()].to(torch.int32)
    base = storage[starts[0]:starts[0] + page].view(num_blocks, 1, block_size, two_d)
    offsets = torch.tensor([s - starts[0] for s in starts], dtype=torch.int64)
    return base, offsets, tables


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("elastic", ["position", "prompt"])
def test_one_launch_over_per_head_caches_equals_the_oracle(num_splits, elastic):
    case = make_case([700, 5, 300], [1, 5, 40], num_heads=6, num_kv_heads=3, head_size=32,
                     rules=[(64, 0.0), (16, 0.5), (200, 0.125)], sink_tokens=16,
                     elastic=elastic)
    head_tables = [2, 0, 3]
    base, offsets, tables = head_class_layout(case, head_tables, num_groups=4)
    out = torch.full_like(case.query, float("nan"))
    span_attention_paged(
        query=case.query, kv_cache=base, block_table=tables,
        query_start_loc=case.query_start_loc, seq_lens=case.seq_lens,
        alpha=case.spans.alpha, beta_q=case.spans.beta_q,
        sink_tokens=case.spans.params.sink_tokens, min_window=case.spans.params.min_window,
        elastic_position=elastic == "position",
        prompt_lens=case.prompt_lens if elastic == "prompt" else None, scale=case.scale,
        output=out, max_query_len=case.max_query_len, max_seq_len=case.max_seq_len,
        head_tables=torch.tensor(head_tables, dtype=torch.int32), head_offsets=offsets,
        num_splits=num_splits)
    assert not torch.isnan(out).any()
    assert (out - reference(case)).abs().max().item() <= 2e-4
