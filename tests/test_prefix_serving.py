"""Smoke of benchmarks/prefix_serving.py (the full run is committed in
benchmarks/results/): real `vllm serve` servers under one KV budget on vLLM's
prefix_repetition workload; MoA with a position-elastic plan hits the prefix cache
as often as stock vLLM, and not at all with caching off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from moa_testing import model_fingerprint

from moa_vllm.plan import uniform_plan

ROOT = Path(__file__).resolve().parent.parent


def test_prefix_serving_smoke(tiny_dir, tmp_path):
    plan = uniform_plan(model_fingerprint(tiny_dir), 0.5, length=304, sink_tokens=16,
                        min_window=16, granule=16, elastic="position")
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "prefix"
    result = subprocess.run(
        [sys.executable, "-P", str(ROOT / "benchmarks" / "prefix_serving.py"),
         "--model", str(tiny_dir), "--plan", f"moa={tmp_path / 'plan.json'}", "--smoke",
         "--dtype", "float32", "--out", str(out), "--server-args", "--enforce-eager"],
        capture_output=True, text=True, timeout=900, env=os.environ,
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["server"], r["caching"]) for r in rows] == [
        ("dense", "on"), ("moa", "on"), ("moa", "off")]
    dense, moa_on, moa_off = rows
    for row in rows:
        assert row["completed"] == row["requested"] and row["failed"] == 0
        assert row["ttft_median_s"] > 0
    assert dense["prefix_hit_rate"] > 0.3
    assert moa_on["prefix_hit_rate"] >= dense["prefix_hit_rate"] - 0.05
    assert moa_off["prefix_hit_rate"] == 0
