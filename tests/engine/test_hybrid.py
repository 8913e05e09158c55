"""Hybrid models (a tiny random Gemma 3: layers 0 and 2 windowed by the model to 64
tokens, two KV heads): MoA serves the full-attention layers, vLLM its own
windowed ones (its backend, spec and manager). Against the HF oracle with spans
that cut and chunked prefill; a full-span plan against vLLM's own backend; the
block pool against the plan's prediction for both kinds of layers."""

from __future__ import annotations

import pytest
import torch
from hf_oracle import load_oracle_model, oracle_logprobs
from moa_testing import held_blocks, heterogeneous_plan, scheduler, start_llm, stop_llm

from moa_vllm.engine.engine_plan import EnginePlan
from moa_vllm.plan import uniform_plan
from moa_vllm.span_classes import cdiv, windowed_held_blocks

BLOCK_SIZE = 64  # vLLM's CPU op runs the windowed layers' blocks (32 tokens: 2 KV heads)
PASSAGE = ("The lighthouse keeper wrote in his log every evening. He noted the wind, "
           "the ships that passed, and the colour of the sea. ")
PROMPT_LENGTHS = [37, 150, 290, 420]


@pytest.fixture(scope="module")
def gemma_dir(tiny_model_of):
    return tiny_model_of("gemma3")


def prompts(model_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(PASSAGE * 40)["input_ids"]
    return [{"prompt_token_ids": ids[i: i + n]} for i, n in enumerate(PROMPT_LENGTHS)]


def greedy(llm, prompt_list, max_tokens, **kwargs):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)
    return llm.generate(prompt_list, params, use_tqdm=False)


@pytest.fixture(scope="module")
def plan(gemma_dir):
    return heterogeneous_plan(gemma_dir, "position", seed=6)


@pytest.fixture(scope="module")
def engine(gemma_dir, plan, tmp_path_factory):
    llm = start_llm(gemma_dir, plan, tmp_path_factory.mktemp("plans"), block_size=BLOCK_SIZE,
                    max_num_batched_tokens=64)  # forces chunked prefill
    yield llm
    stop_llm(llm)


def test_windowed_layers_keep_vllms_backend_and_spec(engine, plan):
    assert plan.model.windowed_layers == [0, 2] and plan.model.sliding_window == 64
    groups = scheduler(engine).kv_cache_manager.kv_cache_config.kv_cache_groups
    windowed = [g for g in groups if not hasattr(g.kv_cache_spec, "head_class")]
    assert {type(g.kv_cache_spec).__name__ for g in windowed} == {"SlidingWindowSpec"}
    assert sorted(name for g in windowed for name in g.layer_names) == [
        "model.layers.0.self_attn.attn", "model.layers.2.self_attn.attn"]
    assert {g.kv_cache_spec.sliding_window for g in windowed} == {64}
    # one page size for all: MoA's one-head slots keep MoA's block size
    moa = [g for g in groups if hasattr(g.kv_cache_spec, "head_class")]
    assert {g.kv_cache_spec.block_size for g in moa} == {BLOCK_SIZE}
    assert len({g.kv_cache_spec.page_size_bytes for g in groups}) == 1


def test_logits_and_tokens_match_the_oracle(engine, plan, gemma_dir):
    outputs = greedy(engine, prompts(gemma_dir), max_tokens=8, logprobs=0, prompt_logprobs=0)
    model = load_oracle_model(gemma_dir)
    full = uniform_plan(plan.model, 1.0)  # MoA dense; the model's windows stay
    for output in outputs:
        prompt = list(output.prompt_token_ids)
        generated = list(output.outputs[0].token_ids)
        tokens = prompt + generated
        ours = oracle_logprobs(model, plan, tokens, len(prompt))
        rows, target = torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])
        engine_lp = [next(iter(lp.values())).logprob for lp in output.prompt_logprobs[1:]]
        engine_lp += [lp[t].logprob for lp, t in zip(output.outputs[0].logprobs, generated)]
        diff = (torch.tensor(engine_lp) - ours[rows, target]).abs().max()
        assert diff <= 2e-3, (len(prompt), float(diff))
        assert ours[len(prompt) - 1:-1].argmax(-1).tolist() == generated  # greedy tokens
        if len(prompt) > 100:  # MoA's spans really cut
            dense = oracle_logprobs(model, full, tokens, len(prompt))
            assert (dense[rows, target] - ours[rows, target]).abs().max() > 0.05


def test_blocks_held_equal_the_plan_prediction_for_both_kinds_of_layers(engine, plan):
    from vllm import SamplingParams

    pool = scheduler(engine).kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    classes = EnginePlan.from_config(engine.llm_engine.vllm_config).head_classes
    engine_core = engine.llm_engine
    engine_core.add_request("long", {"prompt_token_ids": [(7 * i) % 5000 + 100
                                                          for i in range(700)]},
                            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    checked = 0
    while engine_core.has_unfinished_requests():
        engine_core.step()
        for rid, request in scheduler(engine).requests.items():
            if request.num_output_tokens < 8:
                continue
            length = request.num_computed_tokens
            held = held_blocks(engine, rid)
            for c in classes:
                assert abs(held[c.index] - c.held_blocks(length, length, BLOCK_SIZE)) <= 1
            window = windowed_held_blocks(64, length, held_block_size(engine))
            for key in (k for k in held if isinstance(k, str)):
                assert abs(held[key] - window) <= 1, (key, held, window)
                assert held[key] < cdiv(length, held_block_size(engine))  # vLLM freed
            checked += 1
    assert checked > 10
    assert pool.get_num_free_blocks() == free_at_start  # no leak


def held_block_size(llm) -> int:
    groups = scheduler(llm).kv_cache_manager.kv_cache_config.kv_cache_groups
    return next(g.kv_cache_spec.block_size for g in groups
                if not hasattr(g.kv_cache_spec, "head_class"))


def test_full_span_plan_equals_vllms_backend(gemma_dir, tmp_path):
    full = uniform_plan(heterogeneous_plan(gemma_dir, "position").model, 1.0)
    tokens = {}
    for name, backend, plan in [("vllm", None, None), ("moa", "moa", full)]:
        llm = start_llm(gemma_dir, plan, tmp_path, backend=backend, block_size=BLOCK_SIZE,
                        max_num_batched_tokens=64)
        tokens[name] = [list(o.outputs[0].token_ids)
                        for o in greedy(llm, prompts(gemma_dir), max_tokens=16)]
        stop_llm(llm)
    assert tokens["moa"] == tokens["vllm"]
