"""Triton kernels of moa-vllm (no engine imports: plain tensors in, tensors out)."""

from moa_kernels.span_attention import choose_num_splits, span_attention_paged

__all__ = ["span_attention_paged", "choose_num_splits"]
