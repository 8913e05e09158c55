"""Equal memory: under the KV budget of N dense requests, the shipped 0.5 plan runs
about 2N requests of the same length at once (SmolLM2, vLLM's block pool, vLLM's
own admission), vLLM's start-up "maximum concurrency" says so, and a pool filled
this way never deadlocks and leaks no block, also when requests are preempted."""

from __future__ import annotations

from pathlib import Path

import pytest
from moa_testing import FULL_POOL_OUTPUT, FULL_POOL_PROMPT, run_full_pool, start_llm, stop_llm

from moa_vllm.evaluation.served import dense_budget_bytes

DENSE_REQUESTS, SUBMITTED = 4, 12
PLAN = str(Path(__file__).resolve().parents[2] / "plans" / "smollm2-135m-moa-0.5.json")


@pytest.fixture(scope="module")
def budget(smollm2_dir):
    return dense_budget_bytes(smollm2_dir, "float32", DENSE_REQUESTS,
                              FULL_POOL_PROMPT + FULL_POOL_OUTPUT, 128)


def engine_options(budget: int) -> dict:
    # vLLM's own block size for dense (CPU: 128), MoA's choice for MoA
    return dict(max_model_len=FULL_POOL_PROMPT + FULL_POOL_OUTPUT, max_num_seqs=SUBMITTED,
                kv_cache_memory_bytes=budget, block_size=None)


@pytest.fixture(scope="module")
def dense(smollm2_dir, budget):
    llm = start_llm(smollm2_dir, backend=None, **engine_options(budget))
    try:
        yield run_full_pool(llm, SUBMITTED)
    finally:
        stop_llm(llm)


@pytest.fixture(scope="module")
def moa(smollm2_dir, budget):
    llm = start_llm(smollm2_dir, additional_config={"moa": {"plan": PLAN}},
                    **engine_options(budget))
    try:
        yield run_full_pool(llm, SUBMITTED)
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
        run = run_full_pool(llm, SUBMITTED, preempt_every=4)
    finally:
        stop_llm(llm)
    assert run["preempted"] >= 3
    assert run["outputs"] == moa["outputs"]
