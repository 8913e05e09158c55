"""Smoke of benchmarks/serve_throughput.py (the full run is committed in
benchmarks/results/): two real `vllm serve` servers under one KV budget, driven by
`vllm bench serve`; the table is complete and both finished every request."""

from __future__ import annotations

from moa_testing import model_fingerprint, serving_smoke_rows

from moa_vllm.plan import uniform_plan

FIELDS = ("output_tok_s", "ttft_median_s", "ttft_p99_s", "tpot_median_ms", "tpot_p99_ms",
          "peak_running", "preemptions", "kv_mib_per_request", "logged_max_concurrency")


def test_serve_throughput_smoke(tiny_dir, tmp_path):
    plan = uniform_plan(model_fingerprint(tiny_dir), 0.5, length=332, sink_tokens=16,
                        min_window=16, granule=16, elastic="prompt")
    rows, table = serving_smoke_rows("serve_throughput.py", tiny_dir, plan, tmp_path)
    assert [r["server"] for r in rows] == ["dense", "moa"]
    for row in rows:
        assert row["completed"] == row["requested"] and row["failed"] == 0
        assert all(row[f] is not None for f in FIELDS), row
        assert row["peak_running"] >= 1 and row["output_tok_s"] > 0
    dense, moa = rows
    assert moa["logged_max_concurrency"] > dense["logged_max_concurrency"]
    assert moa["kv_mib_per_request"] < dense["kv_mib_per_request"]
    assert "| moa / dense | 300 | " in table
