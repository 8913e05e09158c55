"""Helpers shared by the tests. Engines are expensive (~20-40 s each on CPU):
fixtures that start one are module-scoped, and start them only through here."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent

FP32_LOGPROB_ATOL = 2e-3
"""How far one fp32 model's log-probs may legitimately move between two attention
paths (or batchings) that sum in different orders: a sum of n terms is exact to
n * 2**-24 relative in the worst case, 2.4e-4 for the 4096 keys of the longest
test prompt; log-probs that decide a greedy token lie above -10: 2.4e-3 at most,
and under 2e-3 with the model's own rounding. Not a bound where a path rounds to a
coarser type (fp8 caches: bounded by the fp8 cache's own effect in the same run)."""


def cpu_holds_fp8() -> bool:
    """Whether vLLM's CPU attention op holds an fp8 KV cache on this CPU (it needs
    AVX-512 or AMX). Where it does not, MoA refuses fp8 before the engine starts, as
    ``test_engine_plan`` checks, and the tests of fp8 arithmetic have nothing to run."""
    import torch

    from moa_vllm.engine.vllm_surface.ops import cpu_cache_refusal

    return cpu_cache_refusal(torch.float32, 32, 64, "fp8") is None


def model_fingerprint(model_dir):
    from transformers import AutoConfig

    from moa_vllm.plan import fingerprint_from_hf_config

    return fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir))


def heterogeneous_plan(model_dir, elastic: str, seed: int = 0, sink_tokens: int = 16,
                       granule: int = 1):
    """Different rules per KV head (some elastic), small enough that spans cut
    prompts of a few hundred tokens."""
    from moa_vllm.plan import PLAN_VERSION, Plan, Provenance, full_layer_rows, now_iso

    fp = model_fingerprint(model_dir)
    rng = random.Random(seed)
    rules = full_layer_rows(fp, lambda layer: [
        (rng.choice([8, 24, 40, 72]), rng.choice([0.0, 0.0, 0.125, 0.25]))
        for _ in range(fp.num_kv_heads)])
    return Plan(
        version=PLAN_VERSION, model=fp, sink_tokens=sink_tokens, elastic=elastic,
        min_window=8, granule=granule, rules=rules,
        provenance=Provenance(method="test-random", created=now_iso(), details={"seed": seed}),
    )


def start_llm(model_dir, plan=None, tmp_dir=None, backend: str | None = "moa", **kwargs):
    """A vLLM engine on CPU; ``plan`` (a Plan) is handed over in ``additional_config``
    (without one, plan discovery chooses)."""
    from vllm import LLM

    os.environ.pop("MOA_PLAN", None)
    if plan is not None:
        path = Path(tmp_dir) / f"plan-{id(plan)}.json"
        plan.save(path)
        kwargs.setdefault("additional_config", {"moa": {"plan": str(path)}})
    options = dict(
        enforce_eager=True,
        max_num_seqs=4,
        kv_cache_memory_bytes=256 << 20,
        block_size=16,
        max_model_len=2048,
        dtype="float32",
        seed=0,
    )
    options.update(kwargs)
    if backend is not None:
        options["attention_backend"] = backend
    return LLM(model=str(model_dir), **options)


def stop_llm(llm) -> None:
    from moa_vllm.engine.vllm_surface.entrypoints import shutdown_llm

    shutdown_llm(llm)


def scheduler(llm):
    from moa_vllm.engine.vllm_surface.entrypoints import llm_scheduler

    return llm_scheduler(llm)


def held_blocks(llm, request_id: str) -> dict[int | str, int]:
    """Blocks a request holds right now per head class (vLLM's own block lists);
    the groups of a hybrid model's windowed layers are ``"group <i>"``."""
    from moa_vllm.engine.vllm_surface.kv_manager import is_null_block, request_blocks

    kvm = scheduler(llm).kv_cache_manager
    return {
        getattr(m.kv_cache_spec, "head_class", f"group {g}"): sum(
            1 for b in request_blocks(m, request_id) if not is_null_block(m, b)
        )
        for g, m in enumerate(kvm.coordinator.single_type_managers)
    }


def random_tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


def _prefix_prompts(prefix: int = 2048, tail: int = 40) -> SimpleNamespace:
    """Prompts that share a ``prefix``-token prefix (SmolLM2's vocabulary): ``first``,
    ``second`` and ``third`` share all of it, ``half`` its first half (the middle
    blocks MoA frees early), the ``crowd`` runs together; the ``fillers`` fill a
    pool of three requests past its never-used blocks, so vLLM evicts the oldest
    freed blocks first (the middle ones MoA freed early) and keeps the sinks and
    the last spans."""
    shared = random_tokens(0, prefix)
    first, second, third = (shared + random_tokens(s, tail) for s in (1, 2, 3))
    return SimpleNamespace(
        prefix=prefix, tail=tail, first=first, second=second, third=third,
        half=shared[:prefix // 2] + random_tokens(4, tail),
        crowd=[shared + random_tokens(10 + s, tail) for s in range(6)],
        fillers=[random_tokens(100 + s, n) for s, n in enumerate((prefix, prefix, prefix // 2))])


PrefixPrompts = _prefix_prompts()


FULL_POOL_PROMPT, FULL_POOL_OUTPUT = 2000, 24


def run_full_pool(llm, submitted: int, preempt_every: int = 0) -> dict:
    """Submit ``submitted`` requests of ``FULL_POOL_PROMPT`` random tokens (more than
    the pool holds); step until all finish (with
    ``preempt_every``, preempt the newest running request every that many steps
    while the pool is full)."""
    from vllm import SamplingParams

    from moa_vllm.engine.vllm_surface.entrypoints import preempt_newest

    sched = scheduler(llm)
    preempted = []
    original = sched._preempt_request
    sched._preempt_request = lambda request, *a, **k: (
        preempted.append(request.request_id), original(request, *a, **k))[1]
    pool = sched.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=FULL_POOL_OUTPUT, ignore_eos=True)
    for i in range(submitted):
        engine.add_request(f"full-{i}", {"prompt_token_ids": random_tokens(i, FULL_POOL_PROMPT)},
                           params)
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
            "pool": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks}


def serving_smoke_rows(script: str, model_dir, plan, tmp_path) -> tuple[list[dict], str]:
    """``benchmarks/<script> --smoke`` with ``plan`` served as ``moa`` (real
    ``vllm serve`` servers, fp32, eager): the rows of its JSON and its markdown."""
    plan.save(tmp_path / "plan.json")
    out = tmp_path / Path(script).stem
    result = subprocess.run(
        [sys.executable, "-P", str(ROOT / "benchmarks" / script),
         "--model", str(model_dir), "--plan", f"moa={tmp_path / 'plan.json'}", "--smoke",
         "--dtype", "float32", "--out", str(out), "--server-args", "--enforce-eager"],
        capture_output=True, text=True, timeout=900, env=os.environ,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return (json.loads(out.with_suffix(".json").read_text())["rows"],
            out.with_suffix(".md").read_text())


def token_logprobs(outputs) -> list[tuple[list[int], list[float]]]:
    """Per request: its greedy tokens, and the log-prob of every prompt token after
    the first and of every generated token (``prompt_logprobs=0, logprobs=0``)."""
    runs = []
    for out in outputs:
        ids = list(out.outputs[0].token_ids)
        lps = [next(iter(lp.values())).logprob for lp in out.prompt_logprobs[1:]]
        lps += [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, ids)]
        runs.append((ids, lps))
    return runs


def start_model_free(model_dir, plan=None, tmp_dir=None, backend: str | None = "moa",
                     **kwargs):
    """``start_llm`` with ``model_free_worker`` as the worker: vLLM's whole engine but
    the model's forward, on any vLLM release in the supported range (tests/contacts)."""
    from model_free_worker import WORKER_CLS

    return start_llm(model_dir, plan, tmp_dir, backend, worker_cls=WORKER_CLS,
                     distributed_executor_backend="uni", **kwargs)


@contextmanager
def running_server(argv: list[str], port: int, log_path: Path, env: dict | None = None):
    """A server process (``vllm serve`` or ``moa-vllm serve``) on ``port``, its output
    in ``log_path``; yields once ``/health`` answers, stops it afterwards."""
    import urllib.request

    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        try:
            while True:
                assert proc.poll() is None, Path(log_path).read_text()[-3000:]
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    assert time.time() < deadline, "server did not start"
                    time.sleep(1)
            yield
        finally:
            proc.terminate()
            proc.wait(timeout=60)
