"""Equal memory: under the KV budget of N dense requests, the shipped 0.5 plan runs
about 2N requests of the same length at once (SmolLM2, vLLM's block pool, vLLM's
own admission), vLLM's start-up "maximum concurrency" says so, and a pool filled
this way never deadlocks and leaks no block, also when requests are preempted."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from moa_testing import scheduler, start_llm, stop_llm

from moa_vllm.engine.vllm_surface import kv_pool_blocks, preempt_newest
from moa_vllm.evaluation.served import dense_budget_bytes

PROMPT, OUTPUT, DENSE_REQUESTS, SUBMITTED = 2000, 24, 4, 12
PLAN = str(Path(__file__).resolve().parents[2] / "plans" / "smollm2-135m-moa-0.5.json")


def run_full_pool(llm, preempt_every: int = 0) -> dict:
    """Submit more requests than the pool holds; step until all finish (with
    ``preempt_every``, preempt the newest running request every that many steps
    while the pool is full)."""
    from vllm import SamplingParams

    sched = scheduler(llm)
    preempted = []
    original = sched._preempt_request
    sched._preempt_request = lambda request, *a, **k: (
        preempted.append(request.request_id), original(request, *a, **k))[1]
    pool = sched.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=OUTPUT, ignore_eos=True)
    for i in range(SUBMITTED):
        rng = random.Random(i)
        tokens = [rng.randrange(100, 40000) for _ in range(PROMPT)]
        engine.add_request(f"full-{i}", {"prompt_token_ids": tokens}, params)
    peak, outputs = 0, {}
    for step in range(2000):  # a deadlocked pool stops making progress: bounded
        if not engine.has_unfinished_requests():
            break
        if preempt_every and step % preempt_every == 0 and len(sched.running) >= 6:
            preempt_newest(sched)  # counted by the wrapper above
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        peak = max(peak, len(sched.running))
    assert not engine.has_unfinished_requests(), "the pool stopped making progress"
    assert pool.get_num_free_blocks() == free_at_start  # no leak
    return {"peak": peak, "preempted": len(preempted), "outputs": outputs,
            "logged": llm.llm_engine.vllm_config.cache_config.kv_cache_max_concurrency,
            "pool": kv_pool_blocks(llm.llm_engine.vllm_config)}


@pytest.fixture(scope="module")
def budget(smollm2_dir):
    return dense_budget_bytes(smollm2_dir, "float32", DENSE_REQUESTS, PROMPT + OUTPUT, 128)


def engine_options(budget: int) -> dict:
    # vLLM's own block size for dense (CPU: 128), MoA's choice for MoA
    return dict(max_model_len=PROMPT + OUTPUT, max_num_seqs=SUBMITTED,
                kv_cache_memory_bytes=budget, block_size=None)


@pytest.fixture(scope="module")
def dense(smollm2_dir, budget):
    llm = start_llm(smollm2_dir, backend=None, **engine_options(budget))
    try:
        yield run_full_pool(llm)
    finally:
        stop_llm(llm)


@pytest.fixture(scope="module")
def moa(smollm2_dir, budget):
    llm = start_llm(smollm2_dir, additional_config={"moa": {"plan": PLAN}},
                    **engine_options(budget))
    try:
        yield run_full_pool(llm)
    finally:
        stop_llm(llm)


def test_dense_fills_the_budget(dense):
    assert dense["peak"] == DENSE_REQUESTS and dense["preempted"] == 0
    assert int(dense["logged"]) == DENSE_REQUESTS


def test_moa_runs_about_twice_the_requests(dense, moa):
    # one request at its prefill peak, the rest at the 0.5 plan's spans (~0.47)
    assert moa["peak"] >= 1.75 * dense["peak"], (moa["peak"], dense["peak"])
    assert moa["preempted"] == 0


def test_logged_concurrency_is_what_runs(moa):
    """vLLM's "maximum concurrency" log counts MoA requests as MoA admits them."""
    assert moa["peak"] - 1 < moa["logged"] <= moa["peak"] + 0.05, (moa["logged"], moa["peak"])


def test_forced_preemption_in_a_full_pool_is_exact(smollm2_dir, budget, moa):
    """Preempt the newest running request every few steps once the pool is full:
    preempted requests are recomputed, every one finishes with the tokens it got
    without preemption, and no block leaks."""
    llm = start_llm(smollm2_dir, additional_config={"moa": {"plan": PLAN}},
                    **engine_options(budget))
    try:
        run = run_full_pool(llm, preempt_every=4)
    finally:
        stop_llm(llm)
    assert run["preempted"] >= 3
    assert run["outputs"] == moa["outputs"]
