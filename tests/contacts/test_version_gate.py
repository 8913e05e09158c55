"""MoA checks the installed vLLM when it registers: a release outside the supported
range, or one whose internals MoA touches have moved, stops an engine that asks for
MoA before it starts, with one line that says what and where; an engine that does
not ask for MoA starts as if MoA were not installed. Each case patches vLLM in a
fresh process before the plugin loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from moa_testing import model_fingerprint

from moa_vllm.engine.vllm_surface.contacts import SUPPORTED
from moa_vllm.plan import uniform_plan

SCRIPT = """
import sys
import vllm
{patch}
from vllm.engine.arg_utils import EngineArgs
try:
    EngineArgs(model=sys.argv[1], attention_backend=sys.argv[2] or None,
               enforce_eager=True).create_engine_config()
    print("STARTED")
except Exception as err:
    print("REFUSED", type(err).__name__, repr(str(err)))
"""
NEWER = "vllm.__version__ = '0.99.0'"
REMOVE_FREEING = """
import vllm.v1.core.single_type_kv_cache_manager as managers
for cls in managers.FullAttentionManager.__mro__:
    vars(cls).get('_remove_blocks_in_range') and delattr(cls, '_remove_blocks_in_range')
"""
CHANGE_LOOKUP = """
import vllm.v1.core.kv_cache_coordinator as coordinators
coordinators.HybridKVCacheCoordinator.find_longest_cache_hit = lambda self, hashes, limit: None
"""


@pytest.fixture(scope="module")
def plan_file(tiny_dir, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("plans") / "plan.json"
    uniform_plan(model_fingerprint(tiny_dir), 0.5).save(path)
    return str(path)


def attempt(model_dir, plan_file: str, patch: str, backend: str = "moa",
            **env) -> tuple[str, str]:
    """(the last line the process printed, its log)."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(patch=patch), str(model_dir), backend],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "MOA_PLAN": plan_file, **env})
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    return lines[-1], result.stderr


def refusal(line: str) -> str:
    kind, _, message = line.partition(" ")
    assert kind == "REFUSED", line
    error, _, text = message.partition(" ")
    assert error == "RuntimeError", line
    text = eval(text)  # the repr printed above
    assert "\n" not in text
    return text


def test_a_release_outside_the_range_is_refused_in_one_line(tiny_dir, plan_file):
    line, _ = attempt(tiny_dir, plan_file, NEWER)
    message = refusal(line)
    assert "vLLM 0.99.0" in message
    assert all(version in message for version in SUPPORTED)
    assert "MOA_ALLOW_UNTESTED_VLLM=1" in message


def test_an_untested_release_may_be_tried_with_a_warning(tiny_dir, plan_file):
    line, log = attempt(tiny_dir, plan_file, NEWER, MOA_ALLOW_UNTESTED_VLLM="1")
    assert line == "STARTED"
    assert "vLLM 0.99.0" in log and "trying it" in log


def test_a_removed_internal_is_refused_by_name(tiny_dir, plan_file):
    message = refusal(attempt(tiny_dir, plan_file, REMOVE_FREEING)[0])
    assert "v1/core/single_type_kv_cache_manager.py" in message
    assert "_remove_blocks_in_range is missing" in message


def test_a_changed_signature_is_refused_by_name(tiny_dir, plan_file):
    message = refusal(attempt(tiny_dir, plan_file, CHANGE_LOOKUP)[0])
    assert "HybridKVCacheCoordinator.find_longest_cache_hit takes (self, hashes, limit)" \
        in message


def test_engines_that_do_not_ask_for_moa_are_untouched(tiny_dir, plan_file):
    assert attempt(tiny_dir, plan_file, NEWER + "\n" + REMOVE_FREEING, backend="")[0] == "STARTED"
