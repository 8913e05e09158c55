"""The converted plans at the real models' shapes, without their weights: the exact
Llama-3.2-1B-Instruct configuration (16 layers, 32 query / 8 KV heads of 64, hidden
2048, MLP 8192; the vocabulary is the test tokenizer's, which the fingerprint does
not see) with ``load_format="dummy"``, served with ``attention_backend="moa"`` and
no plan: discovery finds the shipped converted plan.

The forward of a 1B model costs about half a minute per thousand tokens on the
2-core CI machine, so the server and one request above the exact floor run the real
layers; the 4k/8k and full-pool checks run vLLM's whole engine but the forward
(``model_free_worker``): the scheduler, block pool and MoA's KV managers decide
every block without reading a value the layers compute."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from moa_testing import (
    FULL_POOL_OUTPUT,
    FULL_POOL_PROMPT,
    held_blocks,
    run_full_pool,
    scheduler,
    start_llm,
    start_model_free,
    stop_llm,
)
from published_configs import published_model_dir

from moa_vllm.plan import load_plan
from moa_vllm.plan_report import density_table
from moa_vllm.span_classes import cdiv, concurrency

ROOT = Path(__file__).resolve().parents[2]
PLAN = ROOT / "plans" / "llama-3.2-1b-instruct-moa-converted.json"
DENSE_REQUESTS, SUBMITTED = 6, 12
OPTIONS = dict(load_format="dummy", dtype="bfloat16", max_model_len=8192 + 64,
               max_num_batched_tokens=8192 + 64, max_num_seqs=SUBMITTED, block_size=None)


def identity_layers(monkeypatch) -> None:
    from vllm.model_executor.models import llama

    monkeypatch.setattr(llama.LlamaDecoderLayer, "forward",
                        lambda self, positions, hidden_states, residual:
                        (hidden_states, hidden_states if residual is None else residual))


def tokens(n: int, seed: int) -> dict:
    rng = random.Random(seed)
    return {"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(n)]}


def params(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def budget(model_dir: Path) -> int:
    """The KV memory of ``DENSE_REQUESTS`` dense full-pool requests (vLLM's CPU
    block size, 128)."""
    from moa_vllm.evaluation.served import dense_budget_bytes

    return dense_budget_bytes(model_dir, "bfloat16", DENSE_REQUESTS,
                              FULL_POOL_PROMPT + FULL_POOL_OUTPUT, 128)


@pytest.fixture(scope="module")
def model_dir(smollm2_dir, tmp_path_factory) -> Path:
    return published_model_dir("meta-llama--Llama-3.2-1B-Instruct", smollm2_dir,
                               tmp_path_factory.mktemp("llama-3.2-1b"))


@pytest.fixture(scope="module")
def engine(model_dir):
    """The real layers (dummy weights); started on identity layers, as its memory
    profile is moot (the KV budget is given) and 8k tokens through 16 real layers
    would take minutes."""
    with pytest.MonkeyPatch.context() as mp:
        identity_layers(mp)
        llm = start_llm(model_dir, kv_cache_memory_bytes=budget(model_dir), **OPTIONS)
    yield llm
    stop_llm(llm)


@pytest.fixture(scope="module")
def model_free(model_dir):
    llm = start_model_free(model_dir, kv_cache_memory_bytes=budget(model_dir), **OPTIONS)
    yield llm
    stop_llm(llm)


def test_vllm_serve_starts_with_no_plan_flag(model_dir, tmp_path, monkeypatch):
    """``vllm serve <the 1B configuration> --load-format dummy --attention-backend
    moa`` as an operator runs it: discovery serves the converted plan and the
    start-up log says where it came from."""
    import urllib.request

    from moa_vllm.evaluation.served import SERVED_NAME, Server

    for name in ("MOA_PLAN", "MOA_PLANS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    args = ["--load-format", "dummy", "--attention-backend", "moa", "--dtype", "bfloat16",
            "--enforce-eager", "--max-model-len", "4096", "--max-num-seqs", "2",
            "--max-num-batched-tokens", "512", "--kv-cache-memory-bytes", str(256 << 20)]
    with Server(model_dir, args, tmp_path / "server.log", start_timeout_s=600) as server:
        request = urllib.request.Request(
            f"{server.base}/v1/completions", json.dumps(
                {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 4,
                 "ignore_eos": True}).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            reply = json.loads(response.read())
        with urllib.request.urlopen(f"{server.base}/v1/moa/plan", timeout=30) as response:
            report = json.loads(response.read())
        log = server.log.read_text()
    assert reply["usage"]["completion_tokens"] == 4
    assert report["source"] == str(PLAN) and len(report["head_classes"]) == 32
    assert (f"MoA plan {PLAN} (from shipped plans (fingerprint match); the MoA authors' "
            "plan searched on meta-llama/Llama-3.2-1B-Instruct, converted, not validated "
            "by us)") in log


def engine_plan(llm):
    from moa_vllm.engine.engine_plan import EnginePlan

    return EnginePlan.from_config(llm.llm_engine.vllm_config)


def test_discovery_serves_the_converted_plan_with_its_head_classes(engine):
    record = engine_plan(engine)
    shipped = load_plan(PLAN)
    assert Path(record.source) == PLAN and record.plan.rules == shipped.rules
    assert "searched on meta-llama/Llama-3.2-1B-Instruct, converted, not validated by us" \
        in record.how
    classes = {c.index: set(c.kv_heads) for c in record.head_classes}
    said = {}
    for layer, row in enumerate(shipped.head_classes):
        for kv, c in enumerate(row):
            said.setdefault(c, set()).add((layer, kv))
    assert classes == said and len(classes) == 32
    specs = {m.kv_cache_spec.head_class
             for m in scheduler(engine).kv_cache_manager.coordinator.single_type_managers}
    assert specs == set(said)  # one vLLM KV-cache group per head class


def held_against_plan_show(llm, request_id: str, prompt_len: int) -> tuple[int, int]:
    """Blocks the request holds in every class now, and what ``plan show`` predicts
    for its length (its allocated density times the dense blocks of every class)."""
    record = engine_plan(llm)
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    (density,) = density_table(record.plan, [prompt_len], block_size, record.head_classes)
    dense = cdiv(prompt_len, block_size) * len(record.head_classes)
    return sum(held_blocks(llm, request_id).values()), round(density.allocated_density * dense)


def first_decode(llm, request_id: str, prompt: dict) -> tuple[int, int]:
    """Step one request through its first decode step (the query at the prompt's
    length, which ``plan show``'s density describes): held blocks and plan show's.
    Prompts end inside a block, so that step allocates none."""
    engine = llm.llm_engine
    engine.add_request(request_id, prompt, params(3))
    measured = None
    while engine.has_unfinished_requests():
        engine.step()
        for rid, request in scheduler(llm).requests.items():
            if measured is None and request.num_computed_tokens == request.num_prompt_tokens + 1:
                measured = held_against_plan_show(llm, rid, request.num_prompt_tokens)
    return measured


def test_real_forward_frees_what_plan_show_predicts(engine):
    """1100 prompt tokens through the real layers and MoA's CPU op path."""
    pool = scheduler(engine).kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    held, predicted = first_decode(engine, "real", tokens(1100, 1))
    assert held == predicted < 32 * cdiv(1100, 64)  # some class freed blocks
    assert pool.get_num_free_blocks() == free_at_start


@pytest.mark.parametrize("length", [4100, 8200])
def test_blocks_freed_at_4k_and_8k_are_what_plan_show_predicts(model_free, length):
    held, predicted = first_decode(model_free, f"long-{length}", tokens(length, length))
    dense = 32 * cdiv(length, 64)
    assert held == predicted and predicted < 0.85 * dense, (held, predicted, dense)


def test_equal_memory_runs_about_one_over_density_as_many(model_dir, model_free):
    """Under the budget of six dense 2k requests: one MoA request at its prefill peak
    and the rest at their spans (``span_classes.concurrency``), about 1 / density
    as many as dense (the plan holds 0.8 of vLLM's cache at 2k: 7 for 6); nothing
    preempted, nothing leaked."""
    dense = start_model_free(model_dir, backend=None, kv_cache_memory_bytes=budget(model_dir),
                             **OPTIONS)
    try:
        dense_run = run_full_pool(dense, SUBMITTED)
    finally:
        stop_llm(dense)
    record = engine_plan(model_free)
    config = model_free.llm_engine.vllm_config
    length = FULL_POOL_PROMPT + FULL_POOL_OUTPUT
    predicted = concurrency(record.head_classes, length,
                            config.scheduler_config.max_num_batched_tokens,
                            config.cache_config.block_size, config.cache_config.num_gpu_blocks)
    (density,) = density_table(record.plan, [length], config.cache_config.block_size,
                               record.head_classes)
    run = run_full_pool(model_free, SUBMITTED)
    assert dense_run["peak"] == DENSE_REQUESTS
    assert predicted >= 0.95 * DENSE_REQUESTS / density.allocated_density, predicted
    assert int(predicted) <= run["peak"] <= predicted + 1, (run["peak"], predicted)
    assert run["peak"] > DENSE_REQUESTS and run["preempted"] == 0


def test_forced_preemption_in_a_full_pool_leaks_nothing(model_free):
    """Preempted requests are recomputed and finish with all their tokens; every
    block comes back (``run_full_pool`` checks the pool)."""
    run = run_full_pool(model_free, SUBMITTED, preempt_every=3)
    assert run["preempted"] >= 3 and len(run["outputs"]) == SUBMITTED
    assert all(len(tokens) == FULL_POOL_OUTPUT for tokens in run["outputs"].values())
