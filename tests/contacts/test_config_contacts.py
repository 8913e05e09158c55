"""Configuration and the server's routes, on every vLLM release in the supported
range: a bad plan stops start-up in the platform's config hook with one clear
message before the engine starts, and MoA's routes attach only where a MoA engine
is served."""

from __future__ import annotations

import json

import pytest
from moa_testing import model_fingerprint

from moa_vllm.plan import PlanError, uniform_plan


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

    from moa_vllm import registration
    from moa_vllm.engine import configure
    from moa_vllm.serving.routes import MoaEndpointPlugin

    registration.register()
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.setattr(envs, "VLLM_PLUGINS", None, raising=False)
    monkeypatch.setattr(configure, "_configured_here", False)
    assert vllm.plugins.load_endpoint_plugins(("generate",)) == []
    monkeypatch.setattr(configure, "_configured_here", True)
    (plugin,) = vllm.plugins.load_endpoint_plugins(("generate",))
    assert isinstance(plugin, MoaEndpointPlugin)
    monkeypatch.setattr(envs, "VLLM_PLUGINS", ["other"], raising=False)
    assert vllm.plugins.load_endpoint_plugins(("generate",)) == []
