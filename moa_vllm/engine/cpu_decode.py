"""Decode steps on vLLM's own CPU attention op, each KV head over its span's blocks.

With the plan's granule a multiple of the block size, a decode query reads whole
blocks: the sinks' and those from its window start on. A block table that lists
just those, with the length shortened to match, makes MoA decode a dense decode,
which vLLM's C++ op runs over its own block layout (``KVLayout.CPU_ATTN``: vLLM's
writer fills it, our prefill path reads it). Prefill chunks keep the torch path:
their queries' windows differ. Where the op's layout is not one we read (AMX,
NEON, ...), caches keep our own layout and every step runs the torch path.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moa_vllm import envs
from moa_vllm.engine.vllm_surface import (
    CPU_ATTN_PLAIN_ISAS,
    cpu_attention_isa,
    cpu_attn_decode,
    cpu_attn_schedule,
)
from moa_vllm.paged_kv import KVLayout, compact_block_tables, cpu_attn_halves
from moa_vllm.span_mask import LayerSpans


@dataclass(frozen=True)
class KVFormat:
    """How a slot's cache blocks are laid out and who writes them."""

    layout: KVLayout
    isa: str | None  # vLLM's CPU op ISA when its writer fills the cache


TOKEN_ROWS_FORMAT = KVFormat(KVLayout.TOKEN_ROWS, None)  # our writer (or CUDA's) fills it


@functools.lru_cache(maxsize=None)
def kv_format(device_type: str, dtype: torch.dtype, block_size: int, head_size: int) -> KVFormat:
    if device_type == "cpu":
        isa = cpu_attention_isa(dtype, block_size, head_size)
        if isa in CPU_ATTN_PLAIN_ISAS:
            return KVFormat(KVLayout.CPU_ATTN, isa)
    return TOKEN_ROWS_FORMAT


def cache_format(kv_cache: torch.Tensor) -> KVFormat:
    return kv_format(kv_cache.device.type, kv_cache.dtype, kv_cache.shape[2],
                     kv_cache.shape[3] // 2)


@dataclass(frozen=True)
class DecodeSpans:
    """What the op reads in one decode step of one head class, per distinct rule."""

    block_tables: torch.Tensor  # [R, B, blocks] int32: sink blocks, then live window blocks
    seq_lens: torch.Tensor  # [R, B] int32: keys each table lists
    schedules: tuple[torch.Tensor, ...]  # the op's work split, per rule
    rule_of: Mapping[str, int]  # slot name -> rule row


@dataclass(frozen=True)
class DecodeSpanBuilder:
    """Owned by a head class's metadata builder: its slots' distinct rules and the
    op's fixed parameters; ``build`` runs once per pure-decode step."""

    rules: LayerSpans  # one row per distinct rule of the class
    rule_of: Mapping[str, int]  # slot name -> rule row
    block_size: int
    num_queries_per_kv: int
    head_size: int
    dtype: torch.dtype
    isa: str

    @staticmethod
    def supports(granule: int, block_size: int, kv: KVFormat) -> bool:
        """Decode reads whole blocks (sinks are a multiple of the granule) in a
        layout the op reads, and ``MOA_CPU_DECODE`` does not ask for the torch path."""
        path = envs.get(envs.MOA_CPU_DECODE)
        if path not in ("vllm", "torch"):
            raise ValueError(f"{envs.MOA_CPU_DECODE} must be 'vllm' or 'torch'")
        return path == "vllm" and kv.layout is KVLayout.CPU_ATTN and granule % block_size == 0

    def build(self, block_table: torch.Tensor, seq_lens: torch.Tensor,
              prompt_lens: torch.Tensor | None, query_start_loc: torch.Tensor) -> DecodeSpans:
        positions = seq_lens.to(torch.int64) - 1
        n = positions + 1 if prompt_lens is None else prompt_lens.to(torch.int64)
        first = self.rules.first_keys(positions, n)  # [R, B]
        tables, lens = compact_block_tables(block_table, seq_lens, first,
                                            self.rules.sink_tokens, self.block_size)
        schedules = tuple(
            cpu_attn_schedule(len(seq_lens), self.num_queries_per_kv, self.head_size, lens[r],
                              self.dtype, query_start_loc, self.isa)
            for r in range(len(lens)))
        return DecodeSpans(tables, lens, schedules, self.rule_of)


def span_decode(query: torch.Tensor, caches: list[torch.Tensor], decode: list[DecodeSpans],
                slot_names: list[str], query_start_loc: torch.Tensor, scale: float,
                output: torch.Tensor) -> None:
    """One decode step of a layer: query/output ``[B, H, D]``; KV head ``j`` reads
    ``caches[j]`` through its own class's compacted table (``decode[j]``)."""
    num_tokens, num_heads, head_size = query.shape
    group = num_heads // len(caches)
    out = torch.empty((len(caches), num_tokens, group, head_size), dtype=output.dtype)
    for j, (cache, spans, name) in enumerate(zip(caches, decode, slot_names)):
        r = spans.rule_of[name]
        key_cache, value_cache = cpu_attn_halves(cache)
        cpu_attn_decode(query[:, j * group:(j + 1) * group], key_cache, value_cache, out[j],
                        query_start_loc, spans.seq_lens[r], spans.block_tables[r],
                        spans.schedules[r], scale)
    output.copy_(out.transpose(0, 1).reshape(num_tokens, num_heads, head_size))
