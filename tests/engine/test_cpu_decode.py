"""Decode on vLLM's CPU op over compacted block tables: against the oracle on random
caches (written by vLLM's own writer), never reading outside the spans, and in a
real engine token for token against the torch path."""

from __future__ import annotations

import pytest
import torch
from moa_testing import heterogeneous_plan, start_llm, stop_llm

from moa_vllm.engine import cpu_decode
from moa_vllm.engine.cpu_decode import DecodeSpanBuilder, kv_format, span_decode
from moa_vllm.engine.vllm_surface import cpu_attn_write
from moa_vllm.oracle import paged_span_attention_reference
from moa_vllm.paged_kv import KVLayout, cpu_attn_halves
from moa_vllm.span_mask import LayerSpans, quantize_beta

BS, D, GROUP = 16, 64, 3
RULES = [(40, 0.0), (-30, 0.25), (8, 0.5)]  # one per KV head; the third narrower than g


def rules_spans(elastic, sinks, granule):
    alpha = torch.tensor([a for a, _ in RULES], dtype=torch.int32)
    beta = torch.tensor([quantize_beta(b) for _, b in RULES], dtype=torch.int32)
    return LayerSpans(alpha, beta, sinks, 8, elastic, granule)


def decode_case(seed, spans):
    """Four decoding requests; token-rows caches for the oracle, the same keys
    written by vLLM's writer into one cache per KV head for the op."""
    fmt = kv_format("cpu", torch.float32, BS, D)
    assert fmt.layout is KVLayout.CPU_ATTN, fmt
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.tensor([700, 37, 300, 1200], dtype=torch.int32)
    prompt_lens = torch.tensor([650, 30, 100, 1199], dtype=torch.int32)
    width = int(seq_lens.max()) // BS + 2
    num_blocks = 4 * width
    table = torch.randperm(num_blocks, generator=g)[:4 * width].view(4, width).int()
    kv_rows = torch.randn(num_blocks, len(RULES), BS, 2 * D, generator=g)
    caches = [torch.zeros(num_blocks, 1, BS, 2 * D) for _ in RULES]
    slots = torch.arange(num_blocks * BS)
    for h, cache in enumerate(caches):
        k = kv_rows[:, h, :, :D].reshape(-1, 1, D)
        v = kv_rows[:, h, :, D:].reshape(-1, 1, D)
        cpu_attn_write(k, v, *cpu_attn_halves(cache), slots, fmt.isa)
    q = torch.randn(4, len(RULES) * GROUP, D, generator=g)
    qsl = torch.arange(5, dtype=torch.int32)
    pl = prompt_lens if spans.elastic == "prompt" else None
    builder = DecodeSpanBuilder(spans, {f"h{h}": h for h in range(len(RULES))}, BS, GROUP, D,
                                torch.float32, fmt.isa)
    decode = builder.build(table, seq_lens, pl, qsl)
    ref = paged_span_attention_reference(q, kv_rows, table, qsl, seq_lens, spans, 0.125, pl)
    return q, caches, decode, qsl, ref, table, seq_lens, pl


def run(q, caches, decode, qsl):
    out = torch.zeros_like(q)
    span_decode(q, caches, [decode] * len(caches), [f"h{h}" for h in range(len(caches))], qsl,
                0.125, out)
    return out


@pytest.mark.parametrize("elastic", ["position", "prompt"])
@pytest.mark.parametrize("sinks,granule", [(0, 16), (16, 16), (0, 64), (64, 64)])
def test_decode_on_vllm_op_matches_oracle(elastic, sinks, granule):
    spans = rules_spans(elastic, sinks, granule)
    q, caches, decode, qsl, ref, *_ = decode_case(granule + sinks, spans)
    assert (decode.seq_lens < torch.tensor([700, 37, 300, 1200])).any()  # the spans cut
    assert torch.allclose(run(q, caches, decode, qsl), ref, atol=1e-5)


def test_decode_on_vllm_op_never_reads_outside_the_spans():
    spans = rules_spans("position", 16, 16)
    q, caches, decode, qsl, ref, table, seq_lens, _ = decode_case(5, spans)
    for h, cache in enumerate(caches):
        keep = torch.zeros(cache.shape[0], dtype=torch.bool)
        for i, seq_len in enumerate(seq_lens.tolist()):
            t = torch.tensor([seq_len - 1])
            needed = spans.mask(t, torch.arange(seq_len), t + 1)[h, 0]
            keep[table[i][needed.nonzero().flatten() // BS].long()] = True
        cache[~keep] = float("nan")
    out = run(q, caches, decode, qsl)
    assert not out.isnan().any()
    assert torch.allclose(out, ref, atol=1e-5)


# -- in the engine ---------------------------------------------------------------


@pytest.fixture(scope="module")
def decode_paths(tiny_dir, tmp_path_factory):
    """Greedy tokens and logprobs of one granule-16 plan with decode on vLLM's op and
    on the torch path; calls of the op counted in each."""
    from vllm import SamplingParams

    tmp = tmp_path_factory.mktemp("plans")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_dir)("the sea and the wind " * 80)["input_ids"]
    prompts = [{"prompt_token_ids": ids[i:i + n]} for i, n in enumerate([40, 200, 330])]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=0)
    calls = {"n": 0}
    original = cpu_decode.cpu_attn_decode

    def counting(*args):
        calls["n"] += 1
        return original(*args)

    mp = pytest.MonkeyPatch()
    mp.setattr(cpu_decode, "cpu_attn_decode", counting)
    runs = {}
    for name, path in [("op", "vllm"), ("torch", "torch")]:
        mp.setenv("MOA_CPU_DECODE", path)
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


def test_engine_decode_on_vllm_op_equals_torch_path(decode_paths):
    tokens, logprobs, calls = decode_paths["op"]
    torch_tokens, torch_logprobs, torch_calls = decode_paths["torch"]
    assert calls > 0 and torch_calls == 0
    assert tokens == torch_tokens
    for ours, ref in zip(logprobs, torch_logprobs):
        assert torch.allclose(torch.tensor(ours), torch.tensor(ref), atol=2e-3)


def test_only_whole_block_plans_decode_on_vllm_op(monkeypatch):
    fmt = kv_format("cpu", torch.float32, BS, D)
    assert DecodeSpanBuilder.supports(64, BS, fmt) and DecodeSpanBuilder.supports(16, BS, fmt)
    assert not DecodeSpanBuilder.supports(1, BS, fmt)  # token-exact: the torch path
    assert not DecodeSpanBuilder.supports(64, BS, kv_format("cuda", torch.float32, BS, D))
    monkeypatch.setenv("MOA_CPU_DECODE", "torch")
    assert not DecodeSpanBuilder.supports(64, BS, fmt)
    monkeypatch.setenv("MOA_CPU_DECODE", "fast")
    with pytest.raises(ValueError, match="MOA_CPU_DECODE must be 'vllm' or 'torch'"):
        DecodeSpanBuilder.supports(64, BS, fmt)
