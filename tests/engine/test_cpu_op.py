"""Prefill and decode on vLLM's CPU op over compacted block tables: against the
oracle on random caches (written by vLLM's own writer) in mixed batches, never
reading outside the spans, and in a real engine token for token against the torch
path."""

from __future__ import annotations

import pytest
import torch
from moa_testing import FP32_LOGPROB_ATOL, heterogeneous_plan, start_llm, stop_llm

from moa_vllm.engine import cpu_op
from moa_vllm.engine.cpu_op import (
    KVQuant,
    SpanRunBuilder,
    kv_format,
    span_attention,
)
from moa_vllm.engine.vllm_surface.ops import cpu_attn_write
from moa_vllm.oracle import paged_span_attention_reference
from moa_vllm.paged_kv import KVLayout, cpu_attn_halves, kv_views
from moa_vllm.span_mask import LayerSpans, SpanParams, quantize_beta

BS, D, GROUP = 16, 64, 3
RULES = [(40, 0.0), (-30, 0.25), (8, 0.5)]  # one per KV head; the third narrower than g


def rules_spans(elastic, sinks, granule, exact_floor=0):
    alpha = torch.tensor([a for a, _ in RULES], dtype=torch.int32)
    beta = torch.tensor([quantize_beta(b) for _, b in RULES], dtype=torch.int32)
    return LayerSpans(alpha, beta, SpanParams(sinks, 8, elastic, granule, exact_floor))


SEQ_LENS = [700, 167, 300, 1200]  # keys after the step
Q_LENS = [1, 130, 1, 300]  # decode rows and prefill chunks, mixed in one batch
PROMPT_LENS = [650, 400, 100, 1199]


def batch_case(seed, spans, q_lens=Q_LENS, cache_dtype="auto", block_size=BS):
    """Four requests; token-rows caches for the oracle, the same keys written by
    vLLM's writer into one cache per KV head for the op (an fp8 cache: the oracle
    reads what the writer stored)."""
    fmt = kv_format("cpu", torch.float32, block_size, D, cache_dtype)
    assert fmt.layout is KVLayout.CPU_ATTN, fmt
    quant = KVQuant(cache_dtype)
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32)
    prompt_lens = torch.tensor(PROMPT_LENS, dtype=torch.int32)
    width = int(seq_lens.max()) // block_size + 2
    num_blocks = 4 * width
    table = torch.randperm(num_blocks, generator=g)[:4 * width].view(4, width).int()
    kv_rows = torch.randn(num_blocks, len(RULES), block_size, 2 * D, generator=g)
    storage = torch.uint8 if quant.quantized else torch.float32
    caches = [torch.zeros(num_blocks, 1, block_size, 2 * D, dtype=storage) for _ in RULES]
    slots = torch.arange(num_blocks * block_size)
    for h, cache in enumerate(caches):
        k = kv_rows[:, h, :, :D].reshape(-1, 1, D)
        v = kv_rows[:, h, :, D:].reshape(-1, 1, D)
        cpu_attn_write(k, v, *cpu_attn_halves(cache), slots, fmt.isa, cache_dtype=cache_dtype)
        stored_k, stored_v = kv_views(quant.stored(cache), KVLayout.CPU_ATTN)
        kv_rows[:, h] = torch.cat(quant.dequantize(stored_k[:, 0], stored_v[:, 0],
                                                   torch.float32), dim=-1)
    qsl = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(int(qsl[-1]), len(RULES) * GROUP, D, generator=g)
    pl = prompt_lens if spans.params.elastic == "prompt" else None
    builder = SpanRunBuilder(spans, {f"h{h}": h for h in range(len(RULES))}, block_size, GROUP, D,
                             torch.float32, fmt.isa, cache_dtype)
    runs = builder.build(table, seq_lens, pl, qsl)
    ref = paged_span_attention_reference(q, kv_rows, table, qsl, seq_lens, spans, 0.125, pl)
    return q, caches, runs, ref, table, seq_lens, qsl


def run(q, caches, runs, quant=KVQuant()):
    out = torch.zeros_like(q)
    span_attention(q, caches, [runs] * len(caches), [f"h{h}" for h in range(len(caches))],
                   0.125, out, quant)
    return out


@pytest.mark.parametrize("elastic", ["position", "prompt"])
@pytest.mark.parametrize("sinks,granule,floor", [(0, 16, 0), (16, 16, 0), (0, 64, 0),
                                                 (64, 64, 0), (64, 64, 500)])
@pytest.mark.parametrize("q_lens", [Q_LENS, [1, 1, 1, 1]], ids=["mixed", "decode"])
def test_vllm_op_matches_oracle(elastic, sinks, granule, floor, q_lens):
    """``floor`` 500: prompt mode serves requests 2 and 3 whole, position mode every
    query up to 500 (part of request 4's chunk)."""
    spans = rules_spans(elastic, sinks, granule, floor)
    q, caches, runs, ref, *_ = batch_case(granule + sinks, spans, q_lens)
    for rule in runs.rules:  # the spans cut; a prefill chunk is several runs
        assert int(rule.seq_lens.max()) < max(SEQ_LENS)
        assert len(rule.seq_lens) >= (4 if q_lens != Q_LENS else 6)
        assert rule.query_start_loc[-1] == sum(q_lens)
    assert torch.allclose(run(q, caches, runs), ref, atol=1e-5)


def test_vllm_op_matches_oracle_on_an_fp8_cache(cpu_fp8):
    """On the fp8 elements vLLM's writer stored, the op computes what the oracle
    computes in fp32 (the op dequantizes on load; its arithmetic is fp32)."""
    spans = rules_spans("position", 32, 32)
    q, caches, runs, ref, *_ = batch_case(7, spans, cache_dtype="fp8", block_size=32)
    assert torch.allclose(run(q, caches, runs, KVQuant("fp8")), ref, atol=1e-5)


def test_vllm_op_never_reads_outside_the_spans():
    spans = rules_spans("position", 16, 16)
    q, caches, runs, ref, table, seq_lens, qsl = batch_case(5, spans)
    for h, cache in enumerate(caches):
        keep = torch.zeros(cache.shape[0], dtype=torch.bool)
        for i, (seq_len, q_len) in enumerate(zip(seq_lens.tolist(), Q_LENS)):
            t = torch.arange(seq_len - q_len, seq_len)
            needed = spans.mask(t, torch.arange(seq_len), t + 1)[h].any(dim=0)
            keep[table[i][needed.nonzero().flatten() // BS].long()] = True
        cache[~keep] = float("nan")
    out = run(q, caches, runs)
    assert not out.isnan().any()
    assert torch.allclose(out, ref, atol=1e-5)


# -- in the engine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def op_paths(tiny_dir, tmp_path_factory):
    """Greedy tokens and logprobs of one granule-16 plan on vLLM's op and on the
    torch path (chunked prefill, so steps mix prefill chunks and decode rows);
    calls of the op counted in each."""
    from vllm import SamplingParams

    tmp = tmp_path_factory.mktemp("plans")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_dir)("the sea and the wind " * 80)["input_ids"]
    prompts = [{"prompt_token_ids": ids[i:i + n]} for i, n in enumerate([40, 200, 330])]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=0)
    calls = {"n": 0}
    original = cpu_op.cpu_attn_op

    def counting(*args):
        calls["n"] += 1
        return original(*args)

    mp = pytest.MonkeyPatch()
    mp.setattr(cpu_op, "cpu_attn_op", counting)
    runs = {}
    for name, path in [("op", "vllm"), ("torch", "torch")]:
        mp.setenv("MOA_CPU_ATTN", path)
        plan = heterogeneous_plan(tiny_dir, "position", seed=8, granule=16)
        llm = start_llm(tiny_dir, plan, tmp, max_num_batched_tokens=64)
        calls["n"] = 0
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[name] = ([list(o.outputs[0].token_ids) for o in outs],
                      [[next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs]
                       for o in outs], calls["n"])
        stop_llm(llm)
    mp.undo()
    return runs


def test_engine_on_vllm_op_equals_torch_path(op_paths):
    tokens, logprobs, calls = op_paths["op"]
    torch_tokens, torch_logprobs, torch_calls = op_paths["torch"]
    assert calls > 0 and torch_calls == 0
    assert tokens == torch_tokens
    for ours, ref in zip(logprobs, torch_logprobs):
        assert torch.allclose(torch.tensor(ours), torch.tensor(ref), atol=FP32_LOGPROB_ATOL)


def test_only_whole_block_plans_run_on_vllm_op(monkeypatch):
    from moa_vllm.engine.backend import CPU_OP, TORCH, TRITON, choose_path

    def path(granule, device="cpu"):
        return choose_path(device, torch.float32, BS, D, granule)

    assert path(64) == CPU_OP and path(16) == CPU_OP
    assert path(1) == TORCH  # token-exact: the torch path
    assert path(64, "cuda") == TRITON
    monkeypatch.setenv("MOA_CPU_ATTN", "torch")
    assert path(64) == TORCH
    monkeypatch.setenv("MOA_CPU_ATTN", "triton")
    assert path(64) == TRITON
    monkeypatch.setenv("MOA_CPU_ATTN", "fast")
    with pytest.raises(ValueError, match="MOA_CPU_ATTN must be one of vllm, torch, triton"):
        path(64)
