"""KV-cache spec and manager that return blocks outside every span to vLLM's pool.

Each head class (see ``span_classes``) is one KV-cache group of KV-head layers
(one KV head each). Its spec is a ``FullAttentionSpec`` (same page layout) that carries the
class's rules; its manager frees, per request and per step, the blocks that no
later query of any KV head in the class reads, keeping the sinks, and admits a
request by what it will hold (its peak), not by a dense prompt's worth.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields
from typing import Self

from moa_vllm import envs
from moa_vllm.engine.stats import ENGINE_STATS
from moa_vllm.engine.vllm_surface.interface import (
    FullAttentionManager,
    FullAttentionSpec,
    logger,
)
from moa_vllm.engine.vllm_surface.kv_manager import (
    free_block_range,
    is_null_block,
    request_blocks,
)
from moa_vllm.span_classes import HeadClass, concurrency


@dataclass(frozen=True, kw_only=True)
class MoaSpanSpec(FullAttentionSpec):
    """One KV head's full-attention page plus the head class that frees it (and the
    plan's other classes, which share the pool with it)."""

    head_class: int
    classes: tuple[HeadClass, ...]
    in_flight_tokens: int  # tokens scheduled but not settled (admission, sizing)

    _SPAN_FIELDS = ("head_class", "classes", "in_flight_tokens")

    def span(self) -> HeadClass:
        return self.classes[self.head_class]

    def _span_key(self) -> tuple:
        return tuple(getattr(self, f) for f in self._SPAN_FIELDS)

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        # vLLM groups layers whose specs merge; different head classes must not
        # merge, or the group would free with one class's window for all.
        if not all(isinstance(s, MoaSpanSpec) for s in specs) or len(
            {s._span_key() for s in specs}
        ) != 1:
            raise AssertionError("MoA head classes are separate KV-cache groups")
        base = FullAttentionSpec.merge(specs)
        kwargs = {f.name: getattr(base, f.name) for f in fields(FullAttentionSpec)}
        kwargs.update(zip(cls._SPAN_FIELDS, specs[0]._span_key()))
        return cls(**kwargs)

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        return all(
            isinstance(s, MoaSpanSpec) and s._span_key() == self._span_key()
            for s in kv_cache_specs.values()
        )

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """Before the pool is sized (vLLM's check that one request of max_model_len
        fits, and its fit of max_model_len to memory): that request's prefill peak.
        Once sized (vLLM's "maximum concurrency" log): this class's part of the pool
        per request at the concurrency MoA's admission reaches, so the log says how
        many requests really run at once."""
        length = vllm_config.model_config.max_model_len
        pool = vllm_config.cache_config.num_gpu_blocks  # None until the engine sizes it
        if pool is None:
            blocks = self.span().peak_blocks(length, self.in_flight_tokens, self.block_size)
            return blocks * self.page_size_bytes
        at_once = concurrency(self.classes, length, self.in_flight_tokens, self.block_size,
                              pool)
        held = [c.held_blocks(length, length, self.block_size) for c in self.classes]
        share = pool / at_once * held[self.head_class] / sum(held)
        return math.ceil(share * self.page_size_bytes)

    @classmethod
    def for_kv_head(cls, spec: FullAttentionSpec, head_class: int,
                 classes: tuple[HeadClass, ...], in_flight_tokens: int) -> MoaSpanSpec:
        kwargs = {f.name: getattr(spec, f.name) for f in fields(FullAttentionSpec)}
        kwargs["num_kv_heads"] = 1
        return cls(**kwargs, head_class=head_class, classes=classes,
                   in_flight_tokens=in_flight_tokens)


class MoaSpanManager(FullAttentionManager):
    """Frees the dead middle of every request: blocks past the sinks and before
    the class's widest window start."""

    def __init__(self, kv_cache_spec: MoaSpanSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.span = kv_cache_spec.span()
        self.in_flight_tokens = kv_cache_spec.in_flight_tokens
        self.keep_all = envs.get(envs.MOA_KEEP_ALL_BLOCKS) == "1"
        self._freed_until: dict[str, int] = {}  # request -> end of its freed range

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args,
                                   apply_admission_cap: bool = False, prefill_end: int = 0,
                                   **kwargs) -> int:
        """With the admission cap (the scheduler's full-prompt check), a request is
        charged its peak under this class's spans, as vLLM's sliding-window manager
        charges its window."""
        if apply_admission_cap and not self.keep_all:
            self.max_admission_blocks_per_request = self.span.peak_blocks(
                max(num_tokens, prefill_end), self.in_flight_tokens, self.block_size)
        return super().get_num_blocks_to_allocate(
            request_id, num_tokens, *args, apply_admission_cap=apply_admission_cap,
            prefill_end=prefill_end, **kwargs)

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        if self.keep_all:
            return
        if num_prompt_tokens is None and self.span.params.elastic == "prompt":
            return  # N unknown: keep everything rather than guess
        blocks = request_blocks(self, request_id)
        if not blocks:
            return
        t = processed_computed_tokens
        first, last = self.span.dead_blocks(t, num_prompt_tokens or 0, self.block_size)
        last = min(last, len(blocks))
        free_block_range(self, request_id, first, last)
        before = self._freed_until.get(request_id, first)
        now = max(before, last)
        self._freed_until[request_id] = now
        ENGINE_STATS.record_step(
            self.span.index, request_id,
            held=len(blocks) - (now - first),
            freed=now - before,
            kept=t - max(0, min(t, now * self.block_size) - first * self.block_size),
            dense=t,
        )

    def pop_blocks_for_free(self, request_id: str):
        blocks = super().pop_blocks_for_free(request_id)
        if self._freed_until.pop(request_id, None) is not None:
            ENGINE_STATS.record_finish(self.span.index, request_id)
        if blocks and envs.get(envs.MOA_KV_LOG) == "1":
            early = sum(1 for b in blocks if is_null_block(self, b))
            logger.info(
                "MoA KV: request %s head class %d: %d of %d blocks returned to "
                "the pool before the request finished",
                request_id, self.span.index, early, len(blocks),
            )
        return blocks


def owns_cache_hits(specs: list) -> bool:
    """Prefix-cache lookups MoA answers: every group a head class. Only
    position-elastic plans cache prefixes (the engine turns caching off for the
    others)."""
    return bool(specs) and all(isinstance(s, MoaSpanSpec) for s in specs)


def span_cache_hit(specs: list[MoaSpanSpec], cached, max_blocks: int, block_size: int,
                   null_block) -> tuple[list[list], int]:
    """The longest block-aligned prefix every head class can resume from: its sink
    blocks and the blocks of its widest span at that length are cached (blocks
    the class freed keep their hashes in vLLM's pool until reused). Blocks the
    class does not read are the null block, as vLLM's sliding-window lookup
    returns them. Later queries never read further back (windows do not shrink
    as positions grow), so resuming computes exactly what a run without caching
    does."""
    found = [[cached(g, i) for i in range(max_blocks)] for g in range(len(specs))]
    present = [list(itertools.accumulate((b is not None for b in row), initial=0))
               for row in found]

    def needed(spec: MoaSpanSpec, k: int) -> list[range]:
        first, last = spec.span().dead_blocks(k * block_size, 0, block_size)
        if last <= first:
            return [range(k)]
        return [range(min(first, k)), range(min(last, k), k)]

    for k in range(max_blocks, 0, -1):
        ranges = [needed(spec, k) for spec in specs]
        if all(present[g][r.stop] - present[g][r.start] == len(r)
               for g, rs in enumerate(ranges) for r in rs):
            blocks = [[null_block] * k for _ in specs]
            for g, rs in enumerate(ranges):
                for r in rs:
                    blocks[g][r.start:r.stop] = found[g][r.start:r.stop]
            return blocks, k * block_size
    return [[] for _ in specs], 0
