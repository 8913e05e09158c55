"""Serving for real through `moa-vllm serve` (vLLM's OpenAI server): load, faults,
bad input, the MoA routes and metrics. Loopback only; one server for the module."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from moa_testing import heterogeneous_plan, running_server
from moa_vllm.evaluation.served import free_port

MOA_VLLM = str(Path(sys.executable).parent / "moa-vllm")
MODEL = "tiny"


@pytest.fixture(scope="module")
def plan(tiny_dir):
    # Two layers widen with every token (beta = 1): KV keeps growing there, so a
    # small budget sees preemption; the other layers free their middles.
    plan = heterogeneous_plan(tiny_dir, "position", seed=7)
    return plan.model_copy(update={"rules": [[(8, 1.0)] * 2] * 2 + plan.rules[2:]})


@pytest.fixture(scope="module")
def server(tiny_dir, plan, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    plan_path = tmp / "plan.json"
    plan.save(plan_path)
    port = free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_LOGGING_LEVEL": "INFO"}
    env.pop("MOA_PLAN", None)
    page = 2 * 32 * 2 * 4 * 16  # K+V, head_dim 32, 2 KV heads, fp32, 16 tokens
    argv = [MOA_VLLM, "serve", str(tiny_dir), "--plan", str(plan_path),
            "--served-model-name", MODEL, "--port", str(port), "--dtype", "float32",
            "--enforce-eager", "--block-size", "16", "--max-model-len", "512",
            "--max-num-seqs", "4", "--max-num-batched-tokens", "256",
            "--no-scheduler-reserve-full-isl",
            "--kv-cache-memory-bytes", str(4 * 40 * page)]
    with running_server(argv, port, tmp / "server.log", env), \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        yield client, plan_path, tmp / "server.log"


def prompt_ids(i: int, n: int) -> list[int]:
    return [(11 * j + 29 * i) % 4000 + 200 for j in range(n)]


def complete(client, ids, max_tokens=16, stream=False) -> list[int] | str:
    body = {"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if not stream:
        r = client.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]
    text = []
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(text)


def metric(client, name: str) -> float:
    text = client.get("/metrics").text
    values = [float(m.group(1)) for m in
              re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    assert values, f"{name} not in /metrics"
    return sum(values)


def wait_idle(client, limit=60) -> None:
    """vLLM's block pool back to empty and MoA holding nothing."""
    deadline = time.time() + limit
    while time.time() < deadline:
        if (metric(client, "vllm:kv_cache_usage_perc") == 0
                and metric(client, "moa_kv_blocks_held") == 0
                and metric(client, "vllm:num_requests_running") == 0):
            return
        time.sleep(0.5)
    raise AssertionError("KV blocks still held after all requests ended")


def test_plan_route_reflects_the_loaded_plan(server, plan):
    client, plan_path, _ = server
    report = client.get("/v1/moa/plan").json()
    assert report["source"] == str(plan_path)
    assert report["model"] == plan.model.model_dump()
    assert report["provenance"]["method"] == "test-random"
    assert report["source_status"] == "unchanged"
    assert [d["length"] for d in report["densities"]] == [512, 1024, 1536, 2048]
    assert all(0 < d["allocated_density"] <= 1 for d in report["densities"])


def test_load_200_requests_32_clients_equal_sequential(server):
    client, _, _ = server
    distinct = [prompt_ids(i, 120 + 7 * i) for i in range(40)]
    sequential = [complete(client, ids) for ids in distinct]
    freed_before = metric(client, "moa_kv_blocks_freed_total")
    preempted_before = metric(client, "vllm:num_preemptions_total")
    jobs = [(i % 40, bool(i % 2)) for i in range(200)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda job: complete(client, distinct[job[0]], stream=job[1]), jobs))
    assert results == [sequential[i] for i, _ in jobs]
    assert metric(client, "moa_kv_blocks_freed_total") > freed_before  # MoA freed blocks
    assert metric(client, "vllm:num_preemptions_total") > preempted_before  # KV pressure
    wait_idle(client)


def test_disconnects_and_aborts_leak_nothing(server):
    client, _, _ = server
    body = {"model": MODEL, "prompt": prompt_ids(99, 300), "max_tokens": 200,
            "temperature": 0, "ignore_eos": True, "stream": True}

    def disconnect_mid_stream(_):
        with httpx.Client(base_url=client.base_url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                for n, _line in enumerate(r.iter_lines()):
                    if n >= 3:
                        break  # closes the connection mid-stream

    def abort_while_queued(_):
        with httpx.Client(base_url=client.base_url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json=body):
                pass  # leave before the first token: most are still queued

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(disconnect_mid_stream, range(6)))
        list(pool.map(abort_while_queued, range(12)))
    wait_idle(client)
    assert complete(client, prompt_ids(1, 50))  # still serving


@pytest.mark.parametrize(
    "body, status",
    [
        (b"{not json", 400),
        ({"model": MODEL, "prompt": list(range(100, 700)), "max_tokens": 4}, 400),
        ({"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400),
        ({"model": "no-such-model", "prompt": "hi", "max_tokens": 4}, 404),
    ],
    ids=["malformed-json", "longer-than-max-model-len", "negative-max-tokens", "unknown-model"],
)
def test_bad_input_gets_4xx_and_server_keeps_serving(server, body, status):
    client, _, _ = server
    if isinstance(body, bytes):
        r = client.post("/v1/completions", content=body,
                        headers={"Content-Type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert complete(client, prompt_ids(2, 40), max_tokens=4)


def test_plan_file_changing_while_serving_is_reported_not_applied(server, plan):
    client, plan_path, _ = server
    before = complete(client, prompt_ids(3, 200))
    changed = plan.model_copy(update={"sink_tokens": plan.sink_tokens + 1})
    changed.save(plan_path)
    assert client.get("/v1/moa/plan").json()["source_status"] == "changed"
    assert complete(client, prompt_ids(3, 200)) == before  # the loaded plan still serves
    plan_path.unlink()
    assert client.get("/v1/moa/plan").json()["source_status"] == "missing"
    assert complete(client, prompt_ids(3, 200)) == before
    plan.save(plan_path)
    assert client.get("/v1/moa/plan").json()["source_status"] == "unchanged"


def test_launcher_refuses_a_bad_plan_with_one_line(tiny_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "rules": []}')
    result = subprocess.run([MOA_VLLM, "serve", str(tiny_dir), "--plan", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moa-vllm: {bad}: ")
    assert "Traceback" not in result.stderr + result.stdout


def dry_run(*argv: str) -> subprocess.CompletedProcess:
    """``moa-vllm serve --dry-run`` in a process where MoA's routes cannot be imported:
    the banner and the command need no server code of ours (vLLM's config, which the
    banner is computed from, imports fastapi itself)."""
    code = ("import sys; sys.modules['moa_vllm.serving.routes'] = None; "
            "from moa_vllm.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-P", "-c", code, "serve", *argv, "--dry-run"],
                          capture_output=True, text=True, timeout=300)


def test_launcher_hands_the_plan_over_in_additional_config(tiny_dir, plan, tmp_path):
    import shlex

    path = tmp_path / "plan.json"
    plan.save(path)
    result = dry_run(str(tiny_dir), "--plan", str(path), "--block-size", "16",
                     "--additional-config", '{"other": 1}')
    assert result.returncode == 0, result.stderr
    banner, command = result.stdout.strip().splitlines()[0], result.stdout.strip().splitlines()[-1]
    assert banner.startswith(f"MoA plan: {path} (from additional_config; test-random")
    argv = shlex.split(command)
    assert argv.count("--additional-config") == 1
    extra = json.loads(argv[argv.index("--additional-config") + 1])
    assert extra == {"other": 1, "moa": {"plan": str(path)}}

    both = dry_run(str(tiny_dir), "--plan", str(path),
                   "--additional-config", json.dumps({"moa": {"plan": str(path)}}))
    assert both.returncode == 2 and both.stderr.count("\n") == 1
    assert "give one" in both.stderr


def test_banner_reports_the_densities_the_plan_route_serves(tiny_dir, tmp_path):
    """No --block-size: MoA's config hook picks the engine's block size (not 16 here),
    and the banner reports the plan at it, as ``/v1/moa/plan`` does for that engine."""
    import asyncio
    from types import SimpleNamespace

    from moa_testing import start_llm, stop_llm

    from moa_vllm.plan_report import DEFAULT_BLOCK_SIZE, banner
    from moa_vllm.serving.routes import MoaEndpointPlugin

    path = tmp_path / "plan.json"
    heterogeneous_plan(tiny_dir, "position", seed=7, sink_tokens=64, granule=64).save(path)
    result = dry_run(str(tiny_dir), "--plan", str(path), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    printed = "\n".join(result.stdout.strip().splitlines()[:-1])
    llm = start_llm(tiny_dir, additional_config={"moa": {"plan": str(path)}}, block_size=None)
    try:
        state = SimpleNamespace()
        engine = SimpleNamespace(vllm_config=llm.llm_engine.vllm_config)
        asyncio.run(MoaEndpointPlugin().init_state(engine, state, None))
    finally:
        stop_llm(llm)
    route = state.moa_plan_report
    assert route.block_size != DEFAULT_BLOCK_SIZE
    assert printed == banner(route)
