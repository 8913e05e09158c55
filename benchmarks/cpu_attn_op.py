"""vLLM's CPU attention op alone, per layer of a batch-4 SmolLM2 decode step (bf16):
dense (3 KV heads in one call, block 128, vLLM's CPU default) against MoA's way
(one call per KV head, block 64, a half-density span). Tells how much of a decode
step attention is, so how much MoA can speed decode up at all.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/cpu_attn_op.py
"""

from __future__ import annotations

import time

import torch

BATCH, HEAD_SIZE, GROUP, KV_HEADS, DTYPE = 4, 64, 3, 3, torch.bfloat16


def op_call(block_size: int, kv_heads: int, keys: int):
    """A closure running the op once over ``BATCH`` decode rows of ``keys`` keys."""
    from vllm import _custom_ops as ops
    from vllm import envs
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(DTYPE, block_size, HEAD_SIZE, "auto")
    width = keys // block_size + 1
    cache = torch.randn(BATCH * width + 1, kv_heads, 2 * block_size, HEAD_SIZE, dtype=DTYPE)
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = torch.arange(1, BATCH * width + 1, dtype=torch.int32).view(BATCH, width)
    seq_lens = torch.full((BATCH,), keys, dtype=torch.int32)
    starts = torch.arange(BATCH + 1, dtype=torch.int32)
    query = torch.randn(BATCH, kv_heads * GROUP, HEAD_SIZE, dtype=DTYPE)
    out = torch.empty_like(query)
    schedule = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=BATCH, num_heads=kv_heads * GROUP, num_kv_heads=kv_heads, head_dim=HEAD_SIZE,
        seq_lens=seq_lens, dtype=DTYPE, query_start_loc=starts, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)

    def call() -> None:
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=starts, seq_lens=seq_lens, scale=HEAD_SIZE ** -0.5, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
            scheduler_metadata=schedule, s_aux=None)
    return call


def microseconds(call, repeats: int = 200) -> float:
    for _ in range(10):
        call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    print("| context | dense µs/layer (3 KV heads, block 128) | MoA µs/layer (3 calls, block 64, half the keys) |")
    print("|---|---|---|")
    for length in (2048, 4096, 8192):
        dense = microseconds(op_call(128, KV_HEADS, length))
        moa = KV_HEADS * microseconds(op_call(64, 1, length // 2))
        print(f"| {length} | {dense:.0f} | {moa:.0f} |")


if __name__ == "__main__":
    main()
