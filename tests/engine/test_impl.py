"""The backend's torch path (CPU) against the oracle on random paged caches with
shuffled block tables, and proof that it never reads outside the spans."""

from __future__ import annotations

import types

import pytest
import torch

from moa_vllm.engine.impl import TorchImpl
from moa_vllm.oracle import paged_span_attention_reference
from moa_vllm.plan import PLAN_VERSION, ModelFingerprint, Plan, Provenance
from moa_vllm.span_mask import LayerSpans

FP = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=1, num_attention_heads=6,
                      num_kv_heads=2, head_dim=32, max_position_embeddings=4096)
BS = 16


def spans(elastic: str) -> LayerSpans:
    plan = Plan(version=PLAN_VERSION, model=FP, sink_tokens=20, elastic=elastic, min_window=8,
                rules=[[(40, 0.0), (-30, 0.25)]],
                provenance=Provenance(method="test", created="now"))
    return plan.layer_spans(0)


def batch(seed=0):
    """Requests mid-prefill (long chunk at an offset), fresh, and decoding."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.tensor([900, 37, 700, 300])
    q_lens = [600, 37, 1, 1]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()])
    num_blocks = 4 * 60
    table = torch.randperm(num_blocks, generator=g).view(4, 60).int()
    kv = torch.randn(num_blocks, 2, BS, 64, generator=g)
    q = torch.randn(int(qsl[-1]), 6, 32, generator=g)
    prompt_lens = torch.tensor([1000, 37, 500, 250], dtype=torch.int32)
    return q, kv, table, qsl, seq_lens, prompt_lens


def run_torch_path(q, kv, table, qsl, seq_lens, prompt_lens, layer_spans):
    """The torch path over head-class caches: each KV head a one-head view of ``kv``
    and its own shuffled copy of the block table (the cache permuted to match)."""
    md = types.SimpleNamespace(query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=4,
                               prompt_lens=prompt_lens)
    g = torch.Generator().manual_seed(7)
    caches, tables = [], []
    for h in range(kv.shape[1]):
        perm = torch.randperm(kv.shape[0], generator=g)
        cache = torch.empty_like(kv[:, h:h + 1])
        cache[perm] = kv[:, h:h + 1]
        caches.append(cache)
        tables.append(perm[table.long()].int())
    out = torch.zeros_like(q)
    TorchImpl._forward_torch(types.SimpleNamespace(scale=0.2), q, caches, tables, md,
                             layer_spans, out)
    return out


@pytest.mark.parametrize("elastic", ["position", "prompt"])
def test_torch_path_matches_oracle(elastic):
    q, kv, table, qsl, seq_lens, prompt_lens = batch()
    s = spans(elastic)
    pl = prompt_lens if elastic == "prompt" else None
    out = run_torch_path(q, kv, table, qsl, seq_lens, pl, s)
    ref = paged_span_attention_reference(q, kv, table, qsl, seq_lens, s, 0.2, pl)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("elastic", ["position", "prompt"])
def test_torch_path_never_reads_outside_the_spans(elastic):
    q, kv, table, qsl, seq_lens, prompt_lens = batch(1)
    s = spans(elastic)
    pl = prompt_lens if elastic == "prompt" else None
    ref = paged_span_attention_reference(q, kv, table, qsl, seq_lens, s, 0.2, pl)
    poisoned = torch.full_like(kv, float("nan"))
    starts = qsl.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        q_pos = torch.arange(seq_len - (starts[i + 1] - starts[i]), seq_len)
        n = q_pos + 1 if elastic == "position" else torch.full_like(q_pos, int(pl[i]))
        needed = s.mask(q_pos, torch.arange(seq_len), n).any(dim=1)  # per KV head
        for h in range(kv.shape[1]):
            pos = needed[h].nonzero().flatten()
            blocks, offsets = table[i][pos // BS].long(), pos % BS
            poisoned[blocks, h, offsets] = kv[blocks, h, offsets]
    out = run_torch_path(q, poisoned, table, qsl, seq_lens, pl, s)
    assert not out.isnan().any()
    assert torch.allclose(out, ref, atol=1e-5)
