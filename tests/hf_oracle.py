"""The model under the torch oracle: HF transformers with its attention replaced
by ``moa_vllm.oracle.span_attention`` (the exact MoA mask, fp32). Engine logits are
compared against this."""

from __future__ import annotations

import torch

from moa_vllm.oracle import span_attention
from moa_vllm.span_mask import elastic_lengths
from moa_vllm.plan import Plan

_STATE: dict = {}


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    plan: Plan = _STATE["plan"]
    spans = plan.mask_spans(module.layer_idx)  # hybrid models: their own window too
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    pos = torch.arange(q.shape[0])
    n = elastic_lengths(spans, pos, _STATE["prompt_len"])
    out = span_attention(q, k, v, pos, pos, n, spans, scaling)
    return out[None].to(query.dtype), None


def load_oracle_model(model_dir):
    from transformers import AttentionInterface, AutoModelForCausalLM

    AttentionInterface.register("moa_oracle", _oracle_attention)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="moa_oracle"
    )
    return model.eval()


@torch.no_grad()
def oracle_logprobs(model, plan: Plan, token_ids: list[int], prompt_len: int) -> torch.Tensor:
    """log-softmax of the next-token logits at every position: ``[T, vocab]``."""
    _STATE.update(plan=plan, prompt_len=prompt_len)
    logits = model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)
