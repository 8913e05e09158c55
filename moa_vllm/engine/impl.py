"""MoA attention: writes the KV cache and attends within each KV head's span.

Every local KV head of a layer has its own KV-cache layer (its own cache tensor,
block table and slot mapping: its head class's group); KV head 0's is the
layer's own, the others are read from the forward context. The backend picks one
of three implementations per engine (``backend.attention_path``):

- ``TritonImpl`` (CUDA): one launch of the Triton paged-KV kernel (``moa_kernels``)
  covers the layer: each KV head reads its own cache (an offset into the one KV
  allocation) and its own row of the stacked block tables.
- ``CpuOpImpl`` (CPU, plans whose granule is a multiple of the block size): every
  step on vLLM's own CPU op over each head's compacted block tables (``cpu_op``).
- ``TorchImpl`` (CPU otherwise, or ``MOA_CPU_ATTN=torch``: the reference): gathers,
  per KV head from its own cache, only keys inside that head's span, and attends
  for all heads at once.

None ever reads a position outside a span: freed blocks are reused by other
requests.
"""

from __future__ import annotations

import torch

from moa_vllm.engine.backend import CPU_OP, TORCH, TRITON
from moa_vllm.engine.cpu_op import (
    TOKEN_ROWS_FORMAT,
    KVFormat,
    KVQuant,
    cache_format,
    span_attention,
)
from moa_vllm.engine.metadata import (
    CpuOpMetadata,
    MoaAttentionMetadata,
    TorchMetadata,
    TritonMetadata,
)
from moa_vllm.engine.vllm_surface.interface import (
    AttentionImpl,
    AttentionLayer,
    AttentionType,
)
from moa_vllm.engine.vllm_surface.kv_heads import kv_head_context, kv_head_layer_name
from moa_vllm.engine.vllm_surface.ops import (
    cpu_attn_write,
    kv_scale_tensors,
    kv_scales,
    reshape_and_cache_cuda,
)
from moa_vllm.paged_kv import KVLayout, cpu_attn_halves, gather_kv, kv_views
from moa_vllm.span_mask import elastic_lengths, masked_attention


TORCH_QUERY_TILE = 256  # long prefill chunks: each tile reads only its own window


class MoaAttentionImpl(AttentionImpl):
    """What the three share: the checks, and one KV write per local KV head into
    its own KV-head layer's cache."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **kwargs,
    ) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "the model's own sliding window": sliding_window is not None,
            "logits soft-capping": bool(logits_soft_cap),
            "learned attention sinks": sinks is not None,
            "non-decoder attention": attn_type != AttentionType.DECODER,
            "KV-cache sharing between layers": kv_sharing_target_layer_name is not None,
        }
        if bad := [name for name, present in unsupported.items() if present]:
            raise NotImplementedError(f"MoA attention does not support {', '.join(bad)}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: MoaAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("MoA attention does not fuse output quantization")
        if attn_metadata is None:  # profiling run
            return output
        num_tokens = attn_metadata.num_actual_tokens
        self._attend(layer, query[:num_tokens], kv_cache, attn_metadata, output[:num_tokens],
                     KVQuant(self.kv_cache_dtype, *kv_scales(layer)))
        return output

    def _attend(self, layer, query, kv_cache, attn_metadata, output, quant: KVQuant) -> None:
        raise NotImplementedError

    def cache_format(self, kv_cache: torch.Tensor, dtype: torch.dtype) -> KVFormat:
        """How a KV head's cache is laid out and written (writer and reader agree).
        ``dtype``: the model's."""
        return cache_format(kv_cache, dtype, self.kv_cache_dtype)

    def _kv_heads(self, layer, attn_metadata, kv_cache):
        """(metadata, KV cache) of each local KV head's layer."""
        yield attn_metadata, kv_cache
        for j in range(1, self.num_kv_heads):
            md, kv, _ = kv_head_context(kv_head_layer_name(layer.layer_name, j))
            yield md, kv

    def do_kv_cache_update(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Each local KV head goes to its own layer's cache, at its group's slots."""
        quant = KVQuant(self.kv_cache_dtype, *kv_scales(layer))
        for j in range(self.num_kv_heads):
            if j == 0:
                kv, slots = kv_cache, slot_mapping
            else:
                _, kv, slots = kv_head_context(kv_head_layer_name(layer.layer_name, j))
            self._write(layer, key[:, j:j + 1], value[:, j:j + 1], kv, slots, quant)

    def _write(self, layer, key, value, kv_cache, slot_mapping, quant: KVQuant) -> None:
        """vLLM's CPU writer where the cache is in its op's layout, else ours."""
        kv_format = self.cache_format(kv_cache, key.dtype)
        if kv_format.isa is not None:
            cpu_attn_write(key, value, *cpu_attn_halves(kv_cache), slot_mapping[:key.shape[0]],
                           kv_format.isa, quant.k_scale, quant.v_scale, quant.cache_dtype)
        else:
            self._write_torch(*quant.quantize(key, value), quant.stored(kv_cache), slot_mapping)

    @staticmethod
    def _write_torch(key, value, kv_cache, slot_mapping) -> None:
        num_tokens = key.shape[0]
        slots = slot_mapping[:num_tokens]
        valid = slots >= 0
        slots = slots[valid]
        block_size = kv_cache.shape[2]
        blocks, offsets = slots // block_size, slots % block_size
        k_cache, v_cache = kv_views(kv_cache, KVLayout.TOKEN_ROWS)
        k_cache[blocks, :, offsets] = key[valid].to(k_cache.dtype)  # fp8: rounds here
        v_cache[blocks, :, offsets] = value[valid].to(v_cache.dtype)


class TorchImpl(MoaAttentionImpl):
    def _attend(self, layer, query, kv_cache, attn_metadata: TorchMetadata, output,
                quant: KVQuant) -> None:
        heads = list(self._kv_heads(layer, attn_metadata, kv_cache))
        self._forward_torch(query, [quant.stored(kv) for _, kv in heads],
                            [md.block_table for md, _ in heads], attn_metadata,
                            attn_metadata.layer_spans[layer.layer_name], output,
                            self.cache_format(kv_cache, query.dtype).layout, quant)

    def _forward_torch(self, query, caches, tables, md, spans, output,
                       layout: KVLayout = KVLayout.TOKEN_ROWS,
                       quant: KVQuant = KVQuant()) -> None:
        """Per request and per tile of queries: the keys inside the spans of that tile
        (sinks + the widest head's window), each KV head's from its own cache and
        block table (``caches[h]`` ``[blocks, 1, block, 2D]``, ``tables[h]``). A key
        outside a head's own span is read at the tile's last key instead (every
        query reads itself, and that block is never freed) and masked: no head reads
        a block its class may have freed."""
        starts = md.query_start_loc_cpu.tolist()
        seq_lens = md.seq_lens.tolist()
        prompt_lens = None if md.prompt_lens is None else md.prompt_lens.tolist()
        for i in range(md.num_reqs):
            prompt_len = None if prompt_lens is None else prompt_lens[i]
            q_len = starts[i + 1] - starts[i]
            first = seq_lens[i] - q_len  # position of the request's first query row
            for lo in range(0, q_len, TORCH_QUERY_TILE):
                hi = min(q_len, lo + TORCH_QUERY_TILE)
                q_pos = torch.arange(first + lo, first + hi)
                n = elastic_lengths(spans, q_pos, prompt_len)
                k_pos = spans.key_positions(first + lo, int(n[0]), first + hi)
                allowed = spans.mask(q_pos, k_pos, n)  # [Hkv, Tq, Tk]
                own = torch.where(allowed.any(dim=1), k_pos, k_pos[-1])  # [Hkv, Tk]
                kv = [gather_kv(cache, table[i], pos, layout)
                      for cache, table, pos in zip(caches, tables, own)]
                k, v = quant.dequantize(torch.cat([k for k, _ in kv], dim=1),
                                        torch.cat([v for _, v in kv], dim=1), query.dtype)
                rows = slice(starts[i] + lo, starts[i] + hi)
                out = masked_attention(query[rows], k, v, allowed, self.scale)
                output[rows] = out.to(output.dtype)


class CpuOpImpl(MoaAttentionImpl):
    def _attend(self, layer, query, kv_cache, attn_metadata: CpuOpMetadata, output,
                quant: KVQuant) -> None:
        heads = list(self._kv_heads(layer, attn_metadata, kv_cache))
        span_attention(query, [kv for _, kv in heads], [md.op_runs for md, _ in heads],
                       [kv_head_layer_name(layer.layer_name, j) for j in range(len(heads))],
                       self.scale, output, quant)


class TritonImpl(MoaAttentionImpl):
    def _attend(self, layer, query, kv_cache, attn_metadata: TritonMetadata, output,
                quant: KVQuant) -> None:
        scales = kv_scale_tensors(layer) if quant.quantized else (None, None)
        self._forward_triton(query, quant.stored(kv_cache), attn_metadata,
                             attn_metadata.layer_heads[layer.layer_name], output, *scales)

    def _forward_triton(self, query, kv_cache, md, heads, output, k_scale=None,
                        v_scale=None) -> None:
        """One launch for every KV head of the layer (``heads``: ``LayerHeads``); an
        fp8 ``kv_cache`` is dequantized on load with the layer's scale tensors."""
        from moa_kernels import span_attention_paged

        spans, params = heads.spans, heads.spans.params
        span_attention_paged(
            query=query, kv_cache=kv_cache, block_table=md.head_tables,
            query_start_loc=md.query_start_loc, seq_lens=md.seq_lens,
            alpha=spans.alpha, beta_q=spans.beta_q, sink_tokens=params.sink_tokens,
            min_window=params.min_window, exact_floor=params.exact_floor,
            elastic_position=params.elastic == "position",
            prompt_lens=md.prompt_lens, scale=self.scale, output=output,
            max_query_len=md.max_query_len, max_seq_len=md.max_seq_len,
            head_tables=heads.tables, head_offsets=heads.offsets, granule=params.granule,
            num_splits=md.num_splits, k_scale=k_scale, v_scale=v_scale,
        )

    def cache_format(self, kv_cache: torch.Tensor, dtype: torch.dtype) -> KVFormat:
        """The kernel reads token rows (under Triton's CPU interpreter too)."""
        return TOKEN_ROWS_FORMAT

    def _write(self, layer, key, value, kv_cache, slot_mapping, quant: KVQuant) -> None:
        if key.is_cuda:
            reshape_and_cache_cuda(key, value, kv_cache, slot_mapping, self.kv_cache_dtype,
                                   layer)
        else:  # Triton's CPU interpreter (tests): our writer, token rows
            super()._write(layer, key, value, kv_cache, slot_mapping, quant)


IMPLS = {TORCH: TorchImpl, CPU_OP: CpuOpImpl, TRITON: TritonImpl}
