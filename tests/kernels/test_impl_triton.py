"""The backend's Triton path inside a real vLLM engine. On CPU the engine would
take the torch path; here ``MoaAttentionImpl`` is pointed at its Triton path
(the interpreter runs the kernel on CPU tensors), so what CUDA runs — one launch
per layer over the head classes' caches (offsets into vLLM's one KV allocation)
and the builders' stacked block tables, metadata fields, prompt lengths, the
builder's split count, output rows — is checked end to end against the torch
path's engine under chunked prefill."""

from __future__ import annotations

import pytest
from moa_testing import heterogeneous_plan, start_llm, stop_llm

from moa_vllm.engine.impl import MoaAttentionImpl

PROMPT_LENS = [20, 90, 170]


def generate(tiny_dir, plan, tmp, triton: bool) -> tuple[list, list[int]]:
    """Token ids and log-probabilities (prompt and generated), and the split
    counts the kernel ran with."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    import moa_kernels
    from moa_vllm.engine import metadata

    splits: list[int] = []
    kernel = moa_kernels.span_attention_paged

    def recording_kernel(*args, **kwargs):
        assert kwargs["head_offsets"].shape == (2,)  # one launch for the layer's 2 KV heads
        splits.append(kwargs.get("num_splits"))
        return kernel(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        if triton:
            mp.setattr(MoaAttentionImpl, "_triton", staticmethod(lambda query: True))
            mp.setattr(moa_kernels, "span_attention_paged", recording_kernel)
            # decode splits as under full CUDA graphs: fixed by the batch size
            mp.setattr(metadata, "full_decode_graphs", lambda config: True)
        llm = start_llm(tiny_dir, plan, tmp, max_num_batched_tokens=64)  # chunked prefill
        try:
            prompts = [TokensPrompt(prompt_token_ids=[(7 * i + n) % 500 + 3 for i in range(n)])
                       for n in PROMPT_LENS]
            params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=0,
                                    prompt_logprobs=0)
            outputs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            stop_llm(llm)
    runs = []
    for out in outputs:
        ids = list(out.outputs[0].token_ids)
        lps = [next(iter(lp.values())).logprob for lp in out.prompt_logprobs[1:]]
        lps += [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, ids)]
        runs.append((ids, lps))
    return runs, splits


@pytest.mark.parametrize("elastic", ["position", "prompt"])
def test_triton_path_in_engine_matches_torch_path(tiny_dir, tmp_path, elastic):
    plan = heterogeneous_plan(tiny_dir, elastic, seed=7)
    torch_runs, _ = generate(tiny_dir, plan, tmp_path, triton=False)
    triton_runs, splits = generate(tiny_dir, plan, tmp_path, triton=True)
    assert any(s is not None and s > 1 for s in splits), "the split-KV decode never ran"
    assert any(s is None for s in splits), "prefill chunks never reached the kernel"
    for (ids_t, lp_t), (ids_k, lp_k) in zip(torch_runs, triton_runs):
        assert ids_k == ids_t
        assert lp_k == pytest.approx(lp_t, abs=2e-3)
