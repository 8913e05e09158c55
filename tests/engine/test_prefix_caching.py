"""Prefix caching under MoA (position-elastic plans): a request that shares a long
prefix with an earlier one resumes from vLLM's cache past the blocks MoA freed, and
computes exactly what it computes without caching; also after eviction under
memory pressure and under preemption, with no block leaked (SmolLM2, the shipped
0.5 rules in position mode)."""

from __future__ import annotations

from pathlib import Path

import pytest
from moa_testing import FP32_LOGPROB_ATOL, PrefixPrompts, scheduler, start_llm, stop_llm

from moa_vllm.engine.vllm_surface.entrypoints import preempt_newest
from moa_vllm.evaluation.served import dense_budget_bytes
from moa_vllm.plan import load_plan

PLAN = Path(__file__).resolve().parents[2] / "plans" / "smollm2-135m-moa-0.5.json"
PREFIX, TAIL, OUTPUT = PrefixPrompts.prefix, PrefixPrompts.tail, 16
FIRST, SECOND, THIRD = PrefixPrompts.first, PrefixPrompts.second, PrefixPrompts.third
HALF = PrefixPrompts.half
CROWD, FILLERS = PrefixPrompts.crowd, PrefixPrompts.fillers


def sampling():
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=OUTPUT, ignore_eos=True, logprobs=0)


def result(output) -> tuple[list[int], list[float], int]:
    completion = output.outputs[0]
    logprobs = [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]
    return list(completion.token_ids), logprobs, output.num_cached_tokens or 0


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plans") / "position.json"
    load_plan(PLAN).model_copy(update={"elastic": "position"}).save(path)
    return str(path)


def engine(smollm2_dir, plan_path, caching: bool, budget_requests: int = 3):
    budget = dense_budget_bytes(smollm2_dir, "float32", budget_requests,
                                PREFIX + TAIL + OUTPUT, 64)
    return start_llm(smollm2_dir, additional_config={"moa": {"plan": plan_path}},
                     enable_prefix_caching=caching, block_size=None, max_num_seqs=8,
                     max_model_len=PREFIX + TAIL + OUTPUT, kv_cache_memory_bytes=budget)


def one_by_one(llm, prompts) -> list:
    return [result(llm.generate([{"prompt_token_ids": p}], sampling(), use_tqdm=False)[0])
            for p in prompts]


@pytest.fixture(scope="module")
def uncached(smollm2_dir, plan_path):
    llm = engine(smollm2_dir, plan_path, caching=False)
    try:
        singles = one_by_one(llm, [FIRST, SECOND, THIRD, HALF])
        crowd = [result(o) for o in llm.generate([{"prompt_token_ids": p} for p in CROWD],
                                                 sampling(), use_tqdm=False)]
        yield {"singles": singles, "crowd": crowd}
    finally:
        stop_llm(llm)


@pytest.fixture(scope="module")
def cached(smollm2_dir, plan_path):
    llm = engine(smollm2_dir, plan_path, caching=True)
    try:
        first, second = one_by_one(llm, [FIRST, SECOND])
        fillers = one_by_one(llm, FILLERS)
        third, half = one_by_one(llm, [THIRD, HALF])
        yield {"first": first, "second": second, "third": third, "half": half}
    finally:
        stop_llm(llm)


def assert_same(run, reference) -> None:
    assert run[0] == reference[0]
    assert run[1] == pytest.approx(reference[1], abs=FP32_LOGPROB_ATOL)


def test_a_shared_prefix_is_reused_past_the_freed_blocks(cached, uncached):
    assert cached["first"][2] == 0
    assert cached["second"][2] >= 0.9 * PREFIX, cached["second"][2]
    assert_same(cached["first"], uncached["singles"][0])
    assert_same(cached["second"], uncached["singles"][1])


def test_after_eviction_the_spans_still_hit_and_equal_the_uncached_run(cached, uncached):
    """The middle of the prefix was evicted (a prompt that needs it, under the exact
    floor, hits only the sinks), yet the full prefix still hits: its sinks and last
    window are cached. vLLM's own lookup, which needs every block from the start,
    hit 64 tokens here (measured with the MoA lookup switched off)."""
    assert cached["half"][2] < PREFIX // 4, cached["half"][2]
    assert cached["third"][2] >= 0.9 * PREFIX, cached["third"][2]
    assert_same(cached["third"], uncached["singles"][2])
    assert_same(cached["half"], uncached["singles"][3])


def test_preemption_with_cached_prefixes_is_exact_and_leaks_nothing(smollm2_dir, plan_path,
                                                                    uncached):
    llm = engine(smollm2_dir, plan_path, caching=True)
    try:
        sched = scheduler(llm)
        pool = sched.kv_cache_manager.block_pool
        free_at_start = pool.get_num_free_blocks()
        one_by_one(llm, [FIRST])  # the prefix is cached before the crowd comes
        engine_core = llm.llm_engine
        for i, prompt in enumerate(CROWD):
            engine_core.add_request(f"crowd-{i}", {"prompt_token_ids": prompt}, sampling())
        outputs, preempted = {}, 0
        for step in range(1000):
            if not engine_core.has_unfinished_requests():
                break
            if step % 3 == 1 and len(sched.running) >= 2:
                preempt_newest(sched)
                preempted += 1
            for out in engine_core.step():
                if out.finished:
                    outputs[out.request_id] = result(out)
        assert not engine_core.has_unfinished_requests()
        assert preempted >= 2
        crowd = [outputs[f"crowd-{i}"] for i in range(len(CROWD))]
        assert all(c[2] >= 0.9 * PREFIX for c in crowd[:1])  # the first one hit
        for run, reference in zip(crowd, uncached["crowd"]):
            assert_same(run, reference)
        assert pool.get_num_free_blocks() == free_at_start
    finally:
        stop_llm(llm)
