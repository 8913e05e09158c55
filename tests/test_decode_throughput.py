"""Smoke of benchmarks/decode_throughput.py (the full run is committed in
benchmarks/results/): it runs end to end, and MoA's KV per request, read from
vLLM's block pool, is the plan's allocated density, with at least as many
requests in flight as dense under the same KV budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from moa_testing import model_fingerprint

from moa_vllm.plan import uniform_plan

ROOT = Path(__file__).resolve().parent.parent


def test_decode_throughput_smoke(tiny_dir, tmp_path):
    plan = uniform_plan(model_fingerprint(tiny_dir), 0.5, length=512, sink_tokens=16,
                        min_window=16, granule=16)  # on vLLM's op; --torch-path: ours
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "dt"
    result = subprocess.run(
        [sys.executable, "-P", str(ROOT / "benchmarks" / "decode_throughput.py"),
         "--model", str(tiny_dir), "--plan", str(tmp_path / "plan.json"),
         "--lengths", "1024", "--requests", "6", "--out-tokens", "32",
         "--dtype", "float32", "--torch-path", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    moa, dense, torch_path = row["moa"], row["dense"], row["moa_torch"]
    assert moa["samples"] > 0 and dense["samples"] > 0
    for run in (moa, dense, torch_path):  # decode-only steps timed apart from the prefill
        assert run["decode_tokens_per_s"] > 0 and 0 < run["prefill_seconds"] < run["seconds"]
    assert abs(moa["kv_fraction_of_dense"] - row["predicted_allocated_density"]) < 0.1
    assert dense["kv_fraction_of_dense"] > 0.9
    assert moa["peak_running"] > dense["peak_running"]
    assert torch_path["kv_bytes_per_request"] == moa["kv_bytes_per_request"]
    assert row["torch_path_decode_ratio"] > 0


def test_block_size_smoke(tiny_dir, tmp_path):
    """benchmarks/block_size.py: dense, MoA at each candidate and at its own choice,
    each at the block size it names, every run timed."""
    plan = uniform_plan(model_fingerprint(tiny_dir), 0.5, length=256, sink_tokens=32,
                        min_window=32, granule=32)
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "bs"
    result = subprocess.run(
        [sys.executable, "-P", str(ROOT / "benchmarks" / "block_size.py"),
         "--model", str(tiny_dir), "--plan", str(tmp_path / "plan.json"), "--lengths", "384",
         "--requests", "2", "--out-tokens", "8", "--dtype", "float32", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    runs = row["runs"]
    assert [runs[f"moa@{b}"]["block_size"] for b in (16, 32)] == [16, 32]
    assert runs["dense"]["block_size"] == 128  # vLLM's CPU default
    assert runs["moa (its choice)"]["block_size"] in (16, 32)
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_seconds"] > 0 for r in runs.values())
    assert "| 384 | moa (its choice) |" in out.with_suffix(".md").read_text()
