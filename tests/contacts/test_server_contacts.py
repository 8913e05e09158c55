"""vLLM's OpenAI server with MoA, on every vLLM release in the supported range: `vllm
serve MODEL --attention-backend moa` with no other MoA flag (plan discovery, MoA's
block size, the routes' hook) in vLLM's own processes (API server, engine core,
worker), the worker being the model-free one so that vLLM 0.33 runs it on a CPU."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from moa_testing import running_server

from moa_vllm.evaluation.served import VLLM, free_port

TESTS = Path(__file__).resolve().parents[1]


def get(url: str, payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MOA_PLAN", "MOA_PLANS_DIR")}
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_LOGGING_LEVEL="INFO",
               PYTHONPATH=str(TESTS))  # where the engine's worker imports the worker class
    argv = [VLLM, "serve", str(smollm2_dir), "--served-model-name", "smollm2",
            "--attention-backend", "moa", "--port", str(port), "--enforce-eager",
            "--max-model-len", "4096", "--kv-cache-memory-bytes", str(512 << 20),
            "--worker-cls", "model_free_worker.ModelFreeWorker"]
    with running_server(argv, port, tmp / "server.log", env):
        yield f"http://127.0.0.1:{port}", tmp / "server.log"


def test_the_shipped_plan_serves_with_no_moa_flag(server):
    base, log = server
    reply = get(f"{base}/v1/completions", {"model": "smollm2", "prompt": "Hello there",
                                           "max_tokens": 4, "ignore_eos": True})
    assert reply["usage"]["completion_tokens"] == 4
    text = log.read_text()
    assert "smollm2-135m-moa-0.5-position.json" in text and "MoA: KV block size" in text


def test_routes_attach_to_the_server(server):
    base, _ = server
    report = get(f"{base}/v1/moa/plan")
    assert report["source"].endswith("smollm2-135m-moa-0.5-position.json")
    assert 64 % report["block_size"] == 0
    with urllib.request.urlopen(f"{base}/metrics", timeout=60) as response:
        assert "moa_" in response.read().decode()
