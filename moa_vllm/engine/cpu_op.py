"""Attention steps on vLLM's own CPU attention op, each KV head over its span's blocks.

With the plan's granule a multiple of the block size, a query reads whole blocks:
the sinks' and those from its window start on. Consecutive queries of a request
whose window starts at the same block form a *run*; a block table that lists just
the run's blocks, with the length shortened to match, makes the run a causal
chunk of dense attention, which vLLM's C++ op runs over its own block layout
(``KVLayout.CPU_ATTN``: vLLM's writer fills it). A decode row is a run of one; a
prefill chunk of ``T`` queries is about ``T / granule`` runs, so prefill and decode
both run on the op, exactly. Where the op's layout is not one we read (AMX, NEON,
...), or the plan's queries do not read whole blocks, the backend chooses the torch
path instead (``backend.attention_path``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from moa_vllm.engine.vllm_surface.ops import (
    CPU_ATTN_PLAIN_ISAS,
    cpu_attention_isa,
    cpu_attn_op,
    cpu_attn_schedule,
    fp8_storage_dtype,
)
from moa_vllm.paged_kv import KVLayout, compact_block_tables, cpu_attn_halves
from moa_vllm.span_mask import LayerSpans


@dataclass(frozen=True)
class KVFormat:
    """How a KV head's cache blocks are laid out and who writes them."""

    layout: KVLayout
    isa: str | None  # vLLM's CPU op ISA when its writer fills the cache


TOKEN_ROWS_FORMAT = KVFormat(KVLayout.TOKEN_ROWS, None)  # our writer (or CUDA's) fills it


@functools.lru_cache(maxsize=None)
def kv_format(device_type: str, dtype: torch.dtype, block_size: int, head_size: int,
              cache_dtype: str = "auto") -> KVFormat:
    """``dtype``: the model's (queries'); ``cache_dtype``: vLLM's ``kv_cache_dtype``."""
    if device_type == "cpu":
        isa = cpu_attention_isa(dtype, block_size, head_size, cache_dtype)
        if isa in CPU_ATTN_PLAIN_ISAS:
            return KVFormat(KVLayout.CPU_ATTN, isa)
    return TOKEN_ROWS_FORMAT


def on_op(dtype: torch.dtype, block_size: int, head_size: int, cache_dtype: str = "auto") -> bool:
    """Whether vLLM's CPU op lays these blocks out in the layout MoA reads."""
    return kv_format("cpu", dtype, block_size, head_size, cache_dtype).layout is KVLayout.CPU_ATTN


def runs_on_op(dtype: torch.dtype, block_size: int, head_size: int, granule: int,
               cache_dtype: str = "auto") -> bool:
    """Queries read whole blocks (sinks are a multiple of the granule) in a layout the
    op reads."""
    return granule % block_size == 0 and on_op(dtype, block_size, head_size, cache_dtype)


def cache_format(kv_cache: torch.Tensor, dtype: torch.dtype, cache_dtype: str) -> KVFormat:
    return kv_format(kv_cache.device.type, dtype, kv_cache.shape[2], kv_cache.shape[3] // 2,
                     cache_dtype)


@dataclass(frozen=True)
class KVQuant:
    """A quantized KV cache's dtype and the layer's scales (``auto``: none)."""

    cache_dtype: str = "auto"
    k_scale: float = 1.0
    v_scale: float = 1.0

    @property
    def quantized(self) -> bool:
        return self.cache_dtype != "auto"

    def stored(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """The cache as the fp8 elements vLLM's writer stores (it allocates the
        bytes as uint8)."""
        if self.quantized and kv_cache.dtype == torch.uint8:
            return kv_cache.view(fp8_storage_dtype(self.cache_dtype, kv_cache.device))
        return kv_cache

    def dequantize(self, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype):
        if not self.quantized:
            return k, v
        return k.to(dtype) * self.k_scale, v.to(dtype) * self.v_scale

    def quantize(self, k: torch.Tensor, v: torch.Tensor):
        if not self.quantized:
            return k, v
        return k / self.k_scale, v / self.v_scale


@dataclass(frozen=True)
class RuleRuns:
    """One distinct rule's runs in one step: the op's batch, one entry per run."""

    query_start_loc: torch.Tensor  # [P + 1] int32: each run's first query row
    block_tables: torch.Tensor  # [P, blocks] int32: sink blocks, then live window blocks
    seq_lens: torch.Tensor  # [P] int32: keys each table lists (to the run's last query)
    schedule: torch.Tensor  # the op's work split


@dataclass(frozen=True)
class SpanRuns:
    """What the op reads in one step of one head class, per distinct rule."""

    rules: tuple[RuleRuns, ...]
    rule_of: Mapping[str, int]  # KV-head layer name -> rule row


@dataclass(frozen=True)
class SpanRunBuilder:
    """Owned by a head class's metadata builder: its KV heads' distinct rules and the
    op's fixed parameters; ``build`` runs once per step."""

    rules: LayerSpans  # one row per distinct rule of the class
    rule_of: Mapping[str, int]  # KV-head layer name -> rule row
    block_size: int
    num_queries_per_kv: int
    head_size: int
    dtype: torch.dtype
    isa: str
    cache_dtype: str = "auto"  # the op's work split depends on it (fp8 caches)

    def build(self, block_table: torch.Tensor, seq_lens: torch.Tensor,
              prompt_lens: torch.Tensor | None, query_start_loc: torch.Tensor) -> SpanRuns:
        """``query_start_loc`` ``[B + 1]`` (host), ``seq_lens`` ``[B]`` (keys after
        the step), ``block_table`` ``[B, blocks]``."""
        loc = query_start_loc.to(torch.int64)
        q_lens = loc[1:] - loc[:-1]
        num_rows = int(loc[-1])
        req = torch.repeat_interleave(torch.arange(len(q_lens)), q_lens)  # row -> request
        rows = torch.arange(num_rows)
        positions = seq_lens.to(torch.int64)[req] - q_lens[req] + rows - loc[req]
        n = positions + 1 if prompt_lens is None else prompt_lens.to(torch.int64)[req]
        first = self.rules.first_keys(positions, n)  # [R, rows]; never moves backwards
        cut = torch.ones(num_rows, dtype=torch.bool)
        cut[1:] = req[1:] != req[:-1]
        return SpanRuns(tuple(self._runs(block_table, req, positions, f, cut) for f in first),
                        self.rule_of)

    def _runs(self, block_table, req, positions, first, cut) -> RuleRuns:
        """Runs of one rule: a new run where the request or the first key changes."""
        new = cut.clone()
        new[1:] |= first[1:] != first[:-1]
        starts = new.nonzero().flatten()
        ends = torch.cat([starts[1:], starts.new_tensor([len(req)])])
        tables, lens = compact_block_tables(block_table[req[starts]], positions[ends - 1] + 1,
                                            first[starts][None], self.rules.params.sink_tokens,
                                            self.block_size)
        query_start_loc = torch.cat([starts, ends[-1:]]).to(torch.int32)
        schedule = cpu_attn_schedule(len(starts), self.num_queries_per_kv, self.head_size,
                                     lens[0], self.dtype, query_start_loc, self.isa,
                                     cache_dtype=self.cache_dtype)
        return RuleRuns(query_start_loc, tables[0], lens[0], schedule)


def span_attention(query: torch.Tensor, caches: list[torch.Tensor], runs: list[SpanRuns],
                   kv_head_names: list[str], scale: float, output: torch.Tensor,
                   quant: KVQuant = KVQuant()) -> None:
    """One step of a layer: query/output ``[T, H, D]``; KV head ``j`` reads
    ``caches[j]`` through its own class's runs (``runs[j]``); the op dequantizes
    a quantized cache itself."""
    num_tokens, num_heads, head_size = query.shape
    group = num_heads // len(caches)
    out = torch.empty((len(caches), num_tokens, group, head_size), dtype=output.dtype)
    for j, (cache, spans, name) in enumerate(zip(caches, runs, kv_head_names)):
        rule = spans.rules[spans.rule_of[name]]
        key_cache, value_cache = cpu_attn_halves(cache)
        cpu_attn_op(query[:, j * group:(j + 1) * group], key_cache, value_cache, out[j],
                    rule.query_start_loc, rule.seq_lens, rule.block_tables, rule.schedule,
                    scale, quant.k_scale, quant.v_scale, quant.cache_dtype)
    output.copy_(out.transpose(0, 1).reshape(num_tokens, num_heads, head_size))
