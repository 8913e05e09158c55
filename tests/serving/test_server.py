"""`vllm serve MODEL --attention-backend moa` answers chat completions, and a bad
plan stops start-up with one clear message before the engine starts."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

import pytest
from moa_testing import model_fingerprint

from moa_vllm.evaluation.served import VLLM, free_port
from moa_vllm.plan import PlanError, load_plan, uniform_plan


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
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(
        [VLLM, "serve", str(smollm2_dir), "--served-model-name", "smollm2",
         "--attention-backend", "moa", "--port", str(port), "--enforce-eager",
         "--max-model-len", "4096", "--max-num-seqs", "4",
         "--kv-cache-memory-bytes", str(512 << 20)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2)
            break
        except OSError:
            assert time.time() < deadline, "server did not start"
            time.sleep(2)
    yield base, tmp / "server.log"
    proc.terminate()
    proc.wait(timeout=60)


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


def test_bad_plan_fails_before_the_engine_starts(tiny_dir, tmp_path, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    bad = json.loads(uniform_plan(model_fingerprint(tiny_dir), 0.5).model_dump_json())
    bad["rules"][1][0][1] = 2.0
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    monkeypatch.setenv("MOA_PLAN", str(tmp_path / "bad.json"))
    args = EngineArgs(model=str(tiny_dir), attention_backend="moa", enforce_eager=True)
    with pytest.raises(PlanError, match=r"bad.json: rules\[1\]\[0\]: beta must be"):
        args.create_engine_config()


def test_plan_for_another_model_names_both_shapes(tiny_dir, smollm2_dir, tmp_path, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    uniform_plan(model_fingerprint(smollm2_dir), 0.5).save(tmp_path / "other.json")
    monkeypatch.setenv("MOA_PLAN", str(tmp_path / "other.json"))
    args = EngineArgs(model=str(tiny_dir), attention_backend="moa", enforce_eager=True)
    with pytest.raises(PlanError, match="plan is for .*30 layers.* but the model is .*4 layers"):
        args.create_engine_config()


def test_routes_attach_only_to_servers_that_serve_moa(monkeypatch):
    """With no ``VLLM_PLUGINS`` allowlist vLLM attaches no endpoint plugin; MoA's
    attach where this process configured a MoA engine, and an allowlist that does
    not name them keeps them out."""
    import vllm.plugins
    from vllm import envs

    from moa_vllm.engine import engine_plan, registration
    from moa_vllm.serving.routes import MoaEndpointPlugin

    registration.register()
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.setattr(envs, "VLLM_PLUGINS", None, raising=False)
    monkeypatch.setattr(engine_plan, "_RECORDS", {})
    assert vllm.plugins.load_endpoint_plugins(("generate",)) == []
    monkeypatch.setattr(engine_plan, "_RECORDS", {"digest": object()})
    (plugin,) = vllm.plugins.load_endpoint_plugins(("generate",))
    assert isinstance(plugin, MoaEndpointPlugin)
    monkeypatch.setattr(envs, "VLLM_PLUGINS", ["other"], raising=False)
    assert vllm.plugins.load_endpoint_plugins(("generate",)) == []
