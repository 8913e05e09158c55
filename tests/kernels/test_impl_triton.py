"""The backend's Triton path inside a real vLLM engine. On CPU the engine would
take the torch path; here ``MOA_CPU_ATTN=triton`` chooses the Triton path at
start-up (the interpreter runs the kernel on CPU tensors), so what CUDA runs — one launch
per layer over the head classes' caches (offsets into vLLM's one KV allocation)
and the builders' stacked block tables, metadata fields, prompt lengths, the
builder's split count, output rows — is checked end to end against the torch
path's engine under chunked prefill."""

from __future__ import annotations

import pytest
from moa_testing import (
    FP32_LOGPROB_ATOL,
    heterogeneous_plan,
    start_llm,
    stop_llm,
    token_logprobs,
)

from moa_vllm.engine.cpu_op import TOKEN_ROWS_FORMAT
from moa_vllm.engine.impl import TorchImpl

PROMPT_LENS = [20, 90, 170]


def generate(tiny_dir, plan, tmp, triton: bool, token_rows: bool = False,
             **options) -> tuple[list, list[int]]:
    """Token ids and log-probabilities (prompt and generated), and the split
    counts the kernel ran with. ``token_rows``: the torch path on the cache layout
    and writer the Triton path uses (not vLLM's CPU op's)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    import moa_kernels
    from moa_vllm.engine import metadata

    splits: list[int] = []
    kernel = moa_kernels.span_attention_paged

    def recording_kernel(*args, **kwargs):
        assert kwargs["head_offsets"].shape == (2,)  # one launch for the layer's 2 KV heads
        assert (kwargs["k_scale"] is None) == (options.get("kv_cache_dtype") is None)
        splits.append(kwargs.get("num_splits"))
        return kernel(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        if triton:
            mp.setenv("MOA_CPU_ATTN", "triton")
            mp.setattr(moa_kernels, "span_attention_paged", recording_kernel)
            # decode splits as under full CUDA graphs: fixed by the batch size
            mp.setattr(metadata, "full_decode_graphs", lambda config: True)
        if token_rows:
            mp.setattr(TorchImpl, "cache_format", lambda self, kv, dtype: TOKEN_ROWS_FORMAT)
            mp.setenv("MOA_CPU_ATTN", "torch")
        llm = start_llm(tiny_dir, plan, tmp, max_num_batched_tokens=64,  # chunked prefill
                        **options)
        try:
            prompts = [TokensPrompt(prompt_token_ids=[(7 * i + n) % 500 + 3 for i in range(n)])
                       for n in PROMPT_LENS]
            params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0,
                                    prompt_logprobs=0)
            outputs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            stop_llm(llm)
    return token_logprobs(outputs), splits


@pytest.mark.parametrize("elastic", ["position", "prompt"])
def test_triton_path_in_engine_matches_torch_path(tiny_dir, tmp_path, elastic):
    plan = heterogeneous_plan(tiny_dir, elastic, seed=7)
    torch_runs, _ = generate(tiny_dir, plan, tmp_path, triton=False)
    triton_runs, splits = generate(tiny_dir, plan, tmp_path, triton=True)
    assert any(s is not None and s > 1 for s in splits), "the split-KV decode never ran"
    assert any(s is None for s in splits), "prefill chunks never reached the kernel"
    for (ids_t, lp_t), (ids_k, lp_k) in zip(torch_runs, triton_runs):
        assert ids_k == ids_t
        assert lp_k == pytest.approx(lp_t, abs=FP32_LOGPROB_ATOL)


def test_triton_path_in_engine_reads_an_fp8_cache(tiny_dir, tmp_path, cpu_fp8):
    """``--kv-cache-dtype fp8``: the kernel gets the cache as fp8 elements and the
    layer's scale tensors, and answers as the torch path does on the same fp8 cache
    (its agreement with vLLM's CPU op and writer: ``engine/test_kv_quant``)."""
    plan = heterogeneous_plan(tiny_dir, "position", seed=7, sink_tokens=32, granule=32)
    fp8 = {"kv_cache_dtype": "fp8", "block_size": 32}
    torch_runs, _ = generate(tiny_dir, plan, tmp_path, triton=False, token_rows=True, **fp8)
    triton_runs, splits = generate(tiny_dir, plan, tmp_path, triton=True, **fp8)
    assert any(s is not None and s > 1 for s in splits), "the split-KV decode never ran"
    for (ids_o, lp_o), (ids_k, lp_k) in zip(torch_runs, triton_runs):
        assert ids_k == ids_o
        assert lp_k == pytest.approx(lp_o, rel=2e-4, abs=FP32_LOGPROB_ATOL)  # down to -18
