"""The equal-memory decode-step benchmark runs (tiny config, interpreter on CPU):
its MoA step's attention equals the oracle on the same head-class cache, and the
budget holds more MoA requests than dense ones. It cannot rot unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_decode_step_smoke(tmp_path):
    env = dict(os.environ, PYTHONSAFEPATH="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_decode_step.py"),
                           "--smoke", "--out-dir", str(tmp_path), "--tag", "t"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_decode_step_t.json").read_text())
    (row,) = result["rows"]
    for label in ["moa50", "moa25"]:
        moa = row[label]
        assert moa["max_abs_diff_vs_oracle"] < 2e-2
        assert moa["kv_fraction_held"] < 1.0 and moa["step_s"] > 0
        if row["dense"]:
            assert moa["batch"] > row["dense"]["batch"]
    assert "| context | method |" in (tmp_path / "gpu_decode_step_t.md").read_text()
