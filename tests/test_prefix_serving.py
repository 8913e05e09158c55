"""Smoke of benchmarks/prefix_serving.py (its docstring has the full run's
command): real `vllm serve` servers under one KV budget on vLLM's
prefix_repetition workload; MoA with a position-elastic plan hits the prefix cache
as often as stock vLLM, and not at all with caching off."""

from __future__ import annotations

from moa_testing import model_fingerprint, serving_smoke_rows

from moa_vllm.plan import uniform_plan


def test_prefix_serving_smoke(tiny_dir, tmp_path):
    plan = uniform_plan(model_fingerprint(tiny_dir), 0.5, length=304, sink_tokens=16,
                        min_window=16, granule=16, elastic="position")
    rows, _ = serving_smoke_rows("prefix_serving.py", tiny_dir, plan, tmp_path)
    assert [(r["server"], r["caching"]) for r in rows] == [
        ("dense", "on"), ("moa", "on"), ("moa", "off")]
    dense, moa_on, moa_off = rows
    for row in rows:
        assert row["completed"] == row["requested"] and row["failed"] == 0
        assert row["ttft_median_s"] > 0
    assert dense["prefix_hit_rate"] > 0.3
    assert moa_on["prefix_hit_rate"] >= dense["prefix_hit_rate"] - 0.05
    assert moa_off["prefix_hit_rate"] == 0
