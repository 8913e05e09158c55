"""Smoke of benchmarks/kv_capacity.py (the full run is committed in
benchmarks/results/): four real engines (dense and MoA, the model's cache dtype
and fp8) under one KV budget; the block pool shows what each combination holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from moa_testing import ROOT, cpu_holds_fp8, model_fingerprint

from moa_vllm.plan import uniform_plan


def test_kv_capacity_smoke(tiny_dir, tmp_path):
    plan = uniform_plan(model_fingerprint(tiny_dir), 0.5, length=1024, sink_tokens=32,
                        min_window=32, granule=32)
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "kv_capacity"
    proc = subprocess.run(
        [sys.executable, "-P", str(ROOT / "benchmarks" / "kv_capacity.py"), "--model",
         str(tiny_dir), "--plan", str(tmp_path / "plan.json"), "--dtype", "float32",
         "--kv-cache-memory-bytes", str(64 << 20), "--out", str(out), "--smoke"],
        capture_output=True, text=True, timeout=900, env=os.environ)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["engine"], r["kv_cache_dtype"]): r for r in result["rows"]}
    dense, moa = rows["dense", "auto (float32)"], rows["MoA", "auto (float32)"]
    for row in rows.values():
        assert row["kv_mib_1024"] > 0 and row["logged_max_concurrency"] > 0
    assert moa["fraction_1024"] < 0.7
    assert moa["logged_max_concurrency"] > dense["logged_max_concurrency"]
    if not cpu_holds_fp8():  # vLLM's CPU op needs AVX-512 or AMX for fp8
        assert set(rows) == {("dense", "auto (float32)"), ("MoA", "auto (float32)")}
        assert "AVX-512 or AMX" in result["fp8_not_measured"]
        assert "fp8 KV cache: not measured on this CPU" in out.with_suffix(".md").read_text()
        return
    dense_fp8, moa_fp8 = rows["dense", "fp8"], rows["MoA", "fp8"]
    assert dense_fp8["fraction_1024"] == pytest.approx(0.25, rel=0.1)  # 1 byte of 4
    assert moa_fp8["kv_mib_1024"] < moa["kv_mib_1024"] / 3
    assert moa_fp8["kv_mib_1024"] < dense_fp8["kv_mib_1024"]
    assert (moa_fp8["logged_max_concurrency"] > moa["logged_max_concurrency"]
            > dense["logged_max_concurrency"])
    assert "| MoA | fp8 |" in out.with_suffix(".md").read_text()
