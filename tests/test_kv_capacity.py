"""Smoke of benchmarks/kv_capacity.py (the full run is committed in
benchmarks/results/): four real engines (dense and MoA, the model's cache dtype
and fp8) under one KV budget; the block pool shows what each combination holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from moa_testing import ROOT, model_fingerprint

from moa_vllm.plan import uniform_plan


def test_kv_capacity_smoke(tiny_dir, tmp_path):
    plan = uniform_plan(model_fingerprint(tiny_dir), 0.5, length=1024, sink_tokens=32,
                        min_window=32, granule=32)
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "kv_capacity"
    result = subprocess.run(
        [sys.executable, "-P", str(ROOT / "benchmarks" / "kv_capacity.py"), "--model",
         str(tiny_dir), "--plan", str(tmp_path / "plan.json"), "--dtype", "float32",
         "--kv-cache-memory-bytes", str(64 << 20), "--out", str(out), "--smoke"],
        capture_output=True, text=True, timeout=900, env=os.environ)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    rows = {(r["engine"], r["kv_cache_dtype"]): r
            for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    dense, dense_fp8 = rows["dense", "auto (float32)"], rows["dense", "fp8"]
    moa, moa_fp8 = rows["MoA", "auto (float32)"], rows["MoA", "fp8"]
    for row in rows.values():
        assert row["kv_mib_1024"] > 0 and row["logged_max_concurrency"] > 0
    assert dense_fp8["fraction_1024"] == pytest.approx(0.25, rel=0.1)  # 1 byte of 4
    assert moa["fraction_1024"] < 0.7 and moa_fp8["kv_mib_1024"] < moa["kv_mib_1024"] / 3
    assert moa_fp8["kv_mib_1024"] < dense_fp8["kv_mib_1024"]
    assert (moa_fp8["logged_max_concurrency"] > moa["logged_max_concurrency"]
            > dense["logged_max_concurrency"])
    assert "| MoA | fp8 |" in out.with_suffix(".md").read_text()
