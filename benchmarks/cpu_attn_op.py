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
    """A closure running the op once over ``BATCH`` decode rows of ``keys`` keys,
    through the same contacts the engine uses (``vllm_surface``)."""
    from moa_vllm.engine.vllm_surface.ops import (
        cpu_attention_isa,
        cpu_attn_op,
        cpu_attn_schedule,
    )
    from moa_vllm.paged_kv import cpu_attn_halves

    isa = cpu_attention_isa(DTYPE, block_size, HEAD_SIZE)
    width = keys // block_size + 1
    cache = torch.randn(BATCH * width + 1, kv_heads, block_size, 2 * HEAD_SIZE, dtype=DTYPE)
    key_cache, value_cache = cpu_attn_halves(cache)
    table = torch.arange(1, BATCH * width + 1, dtype=torch.int32).view(BATCH, width)
    seq_lens = torch.full((BATCH,), keys, dtype=torch.int32)
    starts = torch.arange(BATCH + 1, dtype=torch.int32)
    query = torch.randn(BATCH, kv_heads * GROUP, HEAD_SIZE, dtype=DTYPE)
    out = torch.empty_like(query)
    schedule = cpu_attn_schedule(BATCH, kv_heads * GROUP, HEAD_SIZE, seq_lens, DTYPE, starts,
                                 isa, num_kv_heads=kv_heads)

    def call() -> None:
        cpu_attn_op(query, key_cache, value_cache, out, starts, seq_lens, table, schedule,
                    HEAD_SIZE ** -0.5)
    return call


def microseconds(call, repeats: int = 200) -> float:
    for _ in range(10):
        call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    from moa_vllm.evaluation.machine import provenance, provenance_lines

    print("\n".join(provenance_lines(provenance())), end="\n\n")
    print("| context | dense µs/layer (3 KV heads, block 128) | MoA µs/layer (3 calls, block 64, half the keys) |")
    print("|---|---|---|")
    for length in (2048, 4096, 8192):
        dense = microseconds(op_call(128, KV_HEADS, length))
        moa = KV_HEADS * microseconds(op_call(64, 1, length // 2))
        print(f"| {length} | {dense:.0f} | {moa:.0f} |")


if __name__ == "__main__":
    main()
