"""Parallel engines. Tensor parallelism: each rank attends with the rules of its
own KV heads (``span_classes.rank_kv_heads``), in head classes on (layer, local KV
slot). Pipeline parallelism: each stage holds its own layers' slots of every head
class (vLLM projects the model's KV-cache groups onto each stage). Real TP=2 and
PP=2 engines on CPU (two workers, one core each) must equal one worker under a
plan whose two KV heads differ, while the plan with the heads' rules swapped
gives other results (so a wrong slice would show)."""

from __future__ import annotations

import pytest
from moa_testing import FP32_LOGPROB_ATOL, model_fingerprint, start_llm, stop_llm

from moa_vllm.plan import PLAN_VERSION, Plan, Provenance, now_iso

PROMPT = "The quick brown fox jumps over the lazy dog. " * 30


def head_plan(tiny_dir, narrow_head: int) -> Plan:
    fp = model_fingerprint(tiny_dir)
    rules = [(16, 0.0), (2048, 0.0)] if narrow_head == 0 else [(2048, 0.0), (16, 0.0)]
    return Plan(version=PLAN_VERSION, model=fp, sink_tokens=4, elastic="position", min_window=8,
                rules=[rules for _ in range(fp.num_layers)],
                provenance=Provenance(method="test-tp", created=now_iso()))


def run(tiny_dir, plan, tmp_path, **parallel) -> tuple[list[int], list[float]]:
    from vllm import SamplingParams

    extra = {**parallel, "distributed_executor_backend": "mp"} if parallel else {}
    llm = start_llm(tiny_dir, plan, tmp_path, **extra)
    try:
        out = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, logprobs=0))[0].outputs[0]
        return list(out.token_ids), [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)]
    finally:
        stop_llm(llm)


@pytest.fixture(scope="module")
def results(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per CPU worker
        tp2 = run(tiny_dir, head_plan(tiny_dir, 0), tmp, tensor_parallel_size=2)
        # vllm-cpu allocates a later stage's input buffers in its compile warm-up
        # only (v1/worker/cpu_model_runner.py warming_up_model): PP runs compiled
        pp2 = run(tiny_dir, head_plan(tiny_dir, 0), tmp, pipeline_parallel_size=2,
                  enforce_eager=False)
    return {"tp2": tp2, "pp2": pp2, "tp1": run(tiny_dir, head_plan(tiny_dir, 0), tmp),
            "swapped": run(tiny_dir, head_plan(tiny_dir, 1), tmp)}


def test_tp2_equals_tp1_and_the_heads_rules_matter(results):
    ids1, lp1 = results["tp1"]
    ids2, lp2 = results["tp2"]
    assert ids2 == ids1
    assert lp2 == pytest.approx(lp1, abs=FP32_LOGPROB_ATOL)
    ids_s, lp_s = results["swapped"]
    assert ids_s != ids1 or max(abs(a - b) for a, b in zip(lp_s, lp1)) > 1e-2


def test_pp2_equals_one_worker(results):
    ids1, lp1 = results["tp1"]
    ids2, lp2 = results["pp2"]
    assert ids2 == ids1
    assert lp2 == pytest.approx(lp1, abs=FP32_LOGPROB_ATOL)
