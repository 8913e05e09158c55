"""KV freeing is real: measured in vLLM's block pool, against the plan tool's
prediction; nothing leaks, also under preemption."""

from __future__ import annotations

import pytest
from moa_testing import held_blocks, heterogeneous_plan, scheduler, start_llm, stop_llm

from moa_vllm.span_classes import assign_span_classes, cdiv

PROMPT_LENGTHS = [300, 520, 700]
MAX_TOKENS = 48
BLOCK_SIZE = 16


def prompts(lengths=PROMPT_LENGTHS):
    return [
        {"prompt_token_ids": [(7 * i + 13 * r) % 5000 + 100 for i in range(n)]}
        for r, n in enumerate(lengths)
    ]


def params(max_tokens=MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def plan(tiny_dir):
    return heterogeneous_plan(tiny_dir, "position", seed=5)


@pytest.fixture(scope="module")
def engine(tiny_dir, plan, tmp_path_factory):
    llm = start_llm(tiny_dir, plan, tmp_path_factory.mktemp("plans"),
                    max_num_batched_tokens=256, block_size=BLOCK_SIZE)
    yield llm
    stop_llm(llm)


def test_blocks_held_at_steady_decode_equal_plan_prediction(engine, plan):
    pool = scheduler(engine).kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    engine_core = engine.llm_engine
    ids = [f"steady-{i}" for i in range(len(PROMPT_LENGTHS))]
    for rid, prompt in zip(ids, prompts()):
        engine_core.add_request(rid, prompt, params())
    classes = assign_span_classes(plan)
    checked = 0
    while engine_core.has_unfinished_requests():
        engine_core.step()
        for rid, request in scheduler(engine).requests.items():  # ids get a suffix
            if request.num_output_tokens < 8:
                continue  # not yet at steady decode
            length = request.num_computed_tokens
            held = held_blocks(engine, rid)
            predicted = {c.index: c.held_blocks(length, request.num_prompt_tokens, BLOCK_SIZE)
                         for c in classes}
            assert held.keys() == predicted.keys()
            for c in predicted:
                assert abs(held[c] - predicted[c]) <= 1, (rid, length, held, predicted)
            assert sum(held.values()) < len(classes) * cdiv(length, BLOCK_SIZE)  # really freed
            checked += 1
    assert checked > 20
    assert pool.get_num_free_blocks() == free_at_start  # no leak


def test_exact_and_leak_free_under_preemption(tiny_dir, plan, tmp_path_factory):
    # Two layers whose heads widen with every token (beta = 1): their classes free
    # nothing, so decode outgrows the budget while the other classes keep freeing.
    plan = plan.model_copy(update={"rules": [[(8, 1.0)] * 2] * 2 + plan.rules[2:]})
    crowd = prompts([200, 220, 240, 260])
    tmp = tmp_path_factory.mktemp("plans")
    roomy = start_llm(tiny_dir, plan, tmp, max_num_batched_tokens=256, block_size=BLOCK_SIZE)
    reference = [o.outputs[0].token_ids for o in roomy.generate(crowd, params(200), use_tqdm=False)]
    stop_llm(roomy)
    # A KV budget of one dense request of max_model_len: the others must wait or
    # be preempted.
    page = 2 * 32 * 2 * 4 * BLOCK_SIZE  # K+V x head_dim x kv_heads x fp32 x tokens
    max_model_len = 512
    small = start_llm(tiny_dir, plan, tmp, max_num_batched_tokens=256, block_size=BLOCK_SIZE,
                      max_model_len=max_model_len,
                      scheduler_reserve_full_isl=False,  # admit optimistically
                      kv_cache_memory_bytes=4 * (max_model_len // BLOCK_SIZE + 2) * page)
    sched = scheduler(small)
    preemptions = []
    original = sched._preempt_request
    sched._preempt_request = lambda request, *a, **k: (
        preemptions.append(request.request_id), original(request, *a, **k))[1]
    free_at_start = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    outputs = small.generate(crowd, params(200), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert preemptions, "the KV budget was meant to force preemption"
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == free_at_start
    stop_llm(small)
