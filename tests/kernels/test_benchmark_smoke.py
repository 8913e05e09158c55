"""The decode benchmark runs (tiny config, interpreter on CPU) and its numbers
make sense: it cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke(tmp_path):
    env = dict(os.environ, PYTHONSAFEPATH="1")
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_decode.py"), "--smoke",
         "--out-dir", str(tmp_path), "--tag", "t"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "kernel_decode_t.json").read_text())
    md = (tmp_path / "kernel_decode_t.md").read_text()
    assert "| batch | context |" in md
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        for label in ["moa25", "moa50", "full"]:
            assert row[label]["time_s"] > 0
        assert 0 < row["moa25"]["density"] < row["moa50"]["density"] < 1
        assert row["full"]["density"] == 1.0
        for label in ["heads1", "headsN"]:  # the head-class layout, both launch shapes
            assert row[label]["time_s"] > 0
        if row["dense_s"] is not None:  # vLLM's source was found: same function
            assert row["full"]["max_abs_diff_vs_dense"] < 1e-2
