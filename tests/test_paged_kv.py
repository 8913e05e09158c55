"""The cache layouts against their writers: what vLLM's CPU writer puts in a block
is what ``kv_views`` reads, and compacted block tables list exactly the span."""

from __future__ import annotations

import pytest
import torch

from moa_vllm.engine.cpu_op import KVQuant, kv_format
from moa_vllm.engine.vllm_surface.ops import cpu_attn_write
from moa_vllm.paged_kv import KVLayout, compact_block_tables, cpu_attn_halves, gather_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_vllm_cpu_writer_layout_is_what_we_read(dtype, block_size):
    fmt = kv_format("cpu", dtype, block_size, 64)
    if fmt.layout is not KVLayout.CPU_ATTN:
        pytest.skip(f"this CPU's attention ISA ({fmt}) keeps our own layout")
    g = torch.Generator().manual_seed(block_size)
    num_blocks, num_kv_heads, head_size, tokens = 12, 3, 64, 5 * block_size + 3
    kv = torch.zeros(num_blocks, 1, block_size, 2 * head_size, dtype=dtype)
    key = torch.randn(tokens, num_kv_heads, head_size, generator=g).to(dtype)
    value = torch.randn(tokens, num_kv_heads, head_size, generator=g).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[7] = -1  # padding is not written
    cpu_attn_write(key[:, 1:2], value[:, 1:2], *cpu_attn_halves(kv), slots, fmt.isa)
    table = torch.arange(num_blocks, dtype=torch.int32)
    kept = slots >= 0
    k, v = gather_kv(kv, table, slots[kept], KVLayout.CPU_ATTN)
    assert torch.equal(k, key[kept, 1:2]) and torch.equal(v, value[kept, 1:2])
    assert kv.view(-1).count_nonzero() <= 2 * head_size * int(kept.sum())


@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e5m2"])
def test_vllm_cpu_fp8_writer_layout_is_what_we_read(cache_dtype, cpu_fp8):
    """vLLM's writer with an fp8 cache and scales: the torch path's read and
    dequantization give the values back to fp8 precision."""
    dtype, block_size, head_size, tokens = torch.float32, 32, 64, 70
    fmt = kv_format("cpu", dtype, block_size, head_size, cache_dtype)
    quant = KVQuant(cache_dtype, k_scale=0.5, v_scale=0.25)
    g = torch.Generator().manual_seed(1)
    kv = torch.zeros(6, 1, block_size, 2 * head_size, dtype=torch.uint8)  # as vLLM allocates
    key = torch.randn(tokens, 1, head_size, generator=g)
    value = torch.randn(tokens, 1, head_size, generator=g)
    slots = torch.randperm(6 * block_size, generator=g)[:tokens]
    cpu_attn_write(key, value, *cpu_attn_halves(kv), slots, fmt.isa, quant.k_scale,
                   quant.v_scale, cache_dtype)
    k, v = quant.dequantize(*gather_kv(quant.stored(kv), torch.arange(6), slots, fmt.layout),
                            dtype)
    tolerance = 0.13 if cache_dtype == "fp8" else 0.26  # one step of 3 / 2 mantissa bits
    assert torch.allclose(k, key, rtol=tolerance, atol=0.02)
    assert torch.allclose(v, value, rtol=tolerance, atol=0.02)


def test_compacted_tables_list_the_sinks_then_the_window():
    g = torch.Generator().manual_seed(0)
    block_size, sinks, width = 16, 32, 40
    table = torch.randperm(400, generator=g)[:3 * width].view(3, width).int()
    seq_lens = torch.tensor([600, 20, 100])
    first = torch.tensor([[32, 32, 32], [512, 32, 64], [576, 32, 96]])  # [R, B]
    tables, lens = compact_block_tables(table, seq_lens, first, sinks, block_size)
    for r in range(first.shape[0]):
        for i, seq_len in enumerate(seq_lens.tolist()):
            want = [*range(min(sinks, seq_len)), *range(int(first[r, i]), seq_len)]
            assert int(lens[r, i]) == len(want)
            got = torch.arange(len(want))
            listed = tables[r, i][got // block_size].long() * block_size + got % block_size
            expect = table[i][torch.tensor(want) // block_size].long() * block_size \
                + torch.tensor(want) % block_size
            assert torch.equal(listed, expect)
