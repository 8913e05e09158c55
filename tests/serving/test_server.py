"""`vllm serve MODEL --attention-backend moa` answers chat completions (a bad plan
stopping start-up, and the routes' hook: ``tests/contacts/test_config_contacts``)."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
from moa_testing import running_server

from moa_vllm.evaluation.served import VLLM, free_port
from moa_vllm.plan import load_plan


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    """``vllm serve MODEL --attention-backend moa`` as an operator turns it on: no
    ``--block-size``, no plan (discovery finds the shipped default), vLLM's default
    dtype; the other flags only bound the test's time and memory."""
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MOA_PLAN", "MOA_PLANS_DIR")}
    env.update(PYTHONSAFEPATH="1", VLLM_ENABLE_V1_MULTIPROCESSING="1",
               VLLM_LOGGING_LEVEL="INFO")
    argv = [VLLM, "serve", str(smollm2_dir), "--served-model-name", "smollm2",
            "--attention-backend", "moa", "--port", str(port), "--enforce-eager",
            "--max-model-len", "4096", "--max-num-seqs", "4",
            "--kv-cache-memory-bytes", str(512 << 20)]
    with running_server(argv, port, tmp / "server.log", env):
        yield f"http://127.0.0.1:{port}", tmp / "server.log"


def test_chat_completion_through_moa(server):
    base, log = server
    reply = post(f"{base}/v1/chat/completions", {
        "model": "smollm2", "temperature": 0, "max_tokens": 20,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    })
    assert "Paris" in reply["choices"][0]["message"]["content"]
    text = log.read_text()
    assert "MoA plan" in text and "smollm2-135m-moa-0.5-position.json" in text  # the default
    assert "MoA: KV block size" in text and "no --block-size given" in text  # MoA chose


def test_plan_route_reports_the_served_plan(server):
    base, _ = server
    with urllib.request.urlopen(f"{base}/v1/moa/plan", timeout=30) as response:
        report = json.loads(response.read())
    plan = load_plan(report["source"])
    assert report["source"].endswith("smollm2-135m-moa-0.5-position.json")
    assert report["exact_floor"] == plan.exact_floor > 0
    assert 64 % report["block_size"] == 0  # the block size MoA chose serves the granule
    dense_up_to_floor = [d for d in report["densities"] if d["length"] < plan.exact_floor]
    assert dense_up_to_floor and all(d["allocated_density"] == 1.0 for d in dense_up_to_floor)
