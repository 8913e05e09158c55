"""Per-step attention metadata of the MoA backend's three implementations, and
their builders (``backend.attention_path`` picks one per engine).

Every builder stages the prompt lengths in a buffer of its own; each adds only
what its implementation reads: the torch path each layer's spans, vLLM's CPU op
its head class's runs, the Triton kernel the stacked block tables of all head
classes and each layer's head rows and cache offsets. The Triton builder owns
every device tensor the kernel reads that is not one of the runner's own
persistent buffers, so a decode step captured in a CUDA graph replays on the
values of the current step.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from moa_vllm.engine.backend import CPU_OP, TORCH, TRITON
from moa_vllm.engine.cpu_op import SpanRunBuilder, SpanRuns, kv_format
from moa_vllm.engine.engine_plan import EnginePlan
from moa_vllm.engine.vllm_surface.config import full_decode_graphs, tensor_parallel_rank
from moa_vllm.engine.vllm_surface.interface import (
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from moa_vllm.engine.vllm_surface.kv_heads import (
    bound_kv_cache,
    kv_head_layer_name,
    kv_head_of,
)
from moa_vllm.span_mask import LayerSpans


@dataclass(frozen=True)
class LayerHeads:
    """What one kernel launch over all local KV heads of a layer reads."""

    spans: LayerSpans  # the layer's rules, one per local KV head
    tables: torch.Tensor  # [heads] int32: each head's row of the stacked block tables
    offsets: torch.Tensor  # [heads] int64: each head's cache, in elements from head 0's


class StackedTables:
    """The block tables of every head class in one ``[classes, max_num_seqs,
    blocks]`` buffer, which each class's builder fills in place every step, so
    one launch per layer reads every KV head's own table (CUDA-graph safe)."""

    _of_engine: ClassVar[dict[int, tuple[weakref.ref, StackedTables]]] = {}

    def __init__(self, num_classes: int, max_seqs: int, device) -> None:
        self.shape = (num_classes, max_seqs)
        self.device = device
        self.tables: torch.Tensor | None = None  # sized by the runner's table width

    @classmethod
    def of_engine(cls, vllm_config, num_classes: int, device) -> StackedTables:
        """The engine's one instance (its builders share its config object)."""
        engines = cls._of_engine
        for key in [k for k, (ref, _) in engines.items() if ref() is None]:
            del engines[key]  # engines that are gone
        ref, tables = engines.get(id(vllm_config), (None, None))
        if ref is None or ref() is not vllm_config:
            tables = cls(num_classes, vllm_config.scheduler_config.max_num_seqs, device)
            engines[id(vllm_config)] = (weakref.ref(vllm_config), tables)
        return tables

    def stage(self, head_class: int, block_table: torch.Tensor, num_reqs: int) -> torch.Tensor:
        if self.tables is None:
            self.tables = torch.zeros((*self.shape, block_table.shape[1]), dtype=torch.int32,
                                      device=self.device)
        self.tables[head_class, :num_reqs].copy_(block_table[:num_reqs], non_blocking=True)
        return self.tables


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


@dataclass
class TorchMetadata(MoaAttentionMetadata):
    layer_spans: Mapping[str, LayerSpans]  # per layer whose KV head 0 is in this group


@dataclass
class CpuOpMetadata(MoaAttentionMetadata):
    op_runs: SpanRuns  # this class's runs and compacted tables


@dataclass
class TritonMetadata(MoaAttentionMetadata):
    num_splits: int | None  # split-KV segments fixed by the builder; None: kernel's choice
    head_tables: torch.Tensor  # [classes, max_num_seqs, blocks] every class's block table
    layer_heads: Mapping[str, LayerHeads]  # per layer whose KV head 0 is in this group


class MoaAttentionMetadataBuilder(AttentionMetadataBuilder[MoaAttentionMetadata]):
    """What all three builders share: the check that the group is one head class,
    the layers' spans, and every request's elastic N (positions follow from
    ``seq_lens`` and the query lengths; prompt lengths come from the runner's R-SWA
    path, see ``vllm_surface.config.request_prompt_lengths``)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    )

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        served = EnginePlan.from_config(vllm_config)
        head_class = served.head_classes[kv_cache_spec.head_class]
        got = {served.class_of(name).index for name in layer_names}
        # a pipeline stage holds the class's KV heads on its own layers
        whole = vllm_config.parallel_config.pipeline_parallel_size == 1
        if got != {head_class.index} or (whole and len(layer_names) != len(head_class.kv_heads)):
            raise RuntimeError(
                f"vLLM formed a KV-cache group of {len(layer_names)} KV heads of head classes "
                f"{sorted(got)}; MoA needs each group to be exactly one head class "
                f"({len(head_class.kv_heads)} KV heads): vLLM's grouping changed")
        self.served = served
        self.head_class = head_class.index
        self.num_kv_heads = served.num_local_kv_heads  # the real layers', not the KV-head layers'
        self.rank = tensor_parallel_rank()
        self.layer_rules = {  # layers whose own KV head 0 is in this group
            name: served.layer_spans(kv_head_of(name)[0], self.rank).to(device)
            for name in layer_names if kv_head_of(name)[1] == 0
        }
        self.prompt_lens = torch.zeros(vllm_config.scheduler_config.max_num_seqs,
                                       dtype=torch.int32, device=device)

    def _common(self, cm: CommonAttentionMetadata) -> dict:
        num_reqs = cm.num_reqs
        prompt_lens = None
        if (host_lens := cm.rswa_prefix_lens) is not None:  # stage them in our buffer
            prompt_lens = self.prompt_lens[:num_reqs]
            prompt_lens.copy_(host_lens[:num_reqs], non_blocking=True)
        return dict(
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


class TorchMetadataBuilder(MoaAttentionMetadataBuilder):
    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TorchMetadata:
        return TorchMetadata(**self._common(common_attn_metadata), layer_spans=self.layer_rules)


class CpuOpMetadataBuilder(MoaAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.span_runs = self._span_run_builder(layer_names)

    def _span_run_builder(self, layer_names) -> SpanRunBuilder:
        """The class's distinct rules and the op's fixed parameters."""
        spec, plan, config = self.kv_cache_spec, self.served.plan, self.vllm_config
        dtype, cache_dtype = config.model_config.dtype, config.cache_config.cache_dtype
        kv = kv_format(self.device.type, dtype, spec.block_size, spec.head_size, cache_dtype)
        rules: dict[tuple[int, int], int] = {}
        rule_of = {}
        for name in layer_names:
            layer, j = kv_head_of(name)
            spans = self.served.layer_spans(layer, self.rank)
            rule = (int(spans.alpha[j]), int(spans.beta_q[j]))
            rule_of[name] = rules.setdefault(rule, len(rules))
        alpha, beta_q = zip(*rules)
        rules_spans = LayerSpans(torch.tensor(alpha, dtype=torch.int32),
                                 torch.tensor(beta_q, dtype=torch.int32), plan.span_params)
        heads = config.model_config.get_num_attention_heads(config.parallel_config)
        return SpanRunBuilder(rules_spans, rule_of, spec.block_size, heads // self.num_kv_heads,
                              spec.head_size, dtype, kv.isa, cache_dtype)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CpuOpMetadata:
        cm = common_attn_metadata
        common = self._common(cm)
        runs = self.span_runs.build(common["block_table"], common["seq_lens"],
                                    common["prompt_lens"], common["query_start_loc_cpu"])
        return CpuOpMetadata(**common, op_runs=runs)


class TritonMetadataBuilder(MoaAttentionMetadataBuilder):
    """Pure single-token decode batches can be replayed as full CUDA graphs: the
    kernel's launch depends only on shapes and host integers fixed here, and
    every tensor it reads is a persistent buffer (the runner's or ours). Mixed
    batches run with piecewise graphs (attention eager)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.layer_heads: dict[str, LayerHeads] = {}  # once the caches are bound
        self.stacked = StackedTables.of_engine(vllm_config, len(self.served.head_classes),
                                               device)

    def _layer_heads(self) -> dict[str, LayerHeads]:
        """Each layer's KV heads: rows of the stacked tables and cache offsets (read
        at the first build, once vLLM has bound the caches; they never move)."""
        if not self.layer_heads:
            for name, spans in self.layer_rules.items():
                layer, _ = kv_head_of(name)
                caches = [bound_kv_cache(self.vllm_config, kv_head_layer_name(name, j))
                          for j in range(self.num_kv_heads)]
                if any(c.stride() != caches[0].stride() for c in caches):
                    raise RuntimeError(f"{name}: the KV heads of one layer differ in layout")
                offsets = [(c.data_ptr() - caches[0].data_ptr()) // c.element_size()
                           for c in caches]
                tables = [self.served.assignment[layer][j] for j in range(self.num_kv_heads)]
                self.layer_heads[name] = LayerHeads(
                    spans, torch.tensor(tables, dtype=torch.int32, device=self.device),
                    torch.tensor(offsets, dtype=torch.int64, device=self.device))
        return self.layer_heads

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TritonMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        return TritonMetadata(
            **self._common(cm),
            num_splits=self._decode_splits(num_reqs, cm.max_query_len),
            head_tables=self.stacked.stage(self.head_class, cm.block_table_tensor, num_reqs),
            layer_heads=self._layer_heads(),
        )

    def _decode_splits(self, num_reqs: int, max_query_len: int) -> int | None:
        """A graph captured at one length replays at every length, so with full
        decode graphs the split count may depend on the batch size only."""
        if max_query_len != 1 or not full_decode_graphs(self.vllm_config):
            return None
        from moa_kernels import choose_num_splits

        return choose_num_splits(num_reqs, self.num_kv_heads, 1, None, self.device)


BUILDERS = {TORCH: TorchMetadataBuilder, CPU_OP: CpuOpMetadataBuilder,
            TRITON: TritonMetadataBuilder}
