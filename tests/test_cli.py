"""`moa-vllm plan uniform` and `moa-vllm plan show` as a user runs them."""

from __future__ import annotations

import json

import pytest

from moa_vllm.cli import main
from moa_vllm.plan import load_plan


def test_growing_uniform_plan_and_its_report(tiny_dir, tmp_path, capsys):
    out, png = tmp_path / "u.json", tmp_path / "u.png"
    main(["plan", "uniform", "--model", str(tiny_dir), "--density", "0.25", "--grow",
          "--elastic", "prompt", "--out", str(out)])
    assert "0.25 * N -64" in capsys.readouterr().out
    plan = load_plan(out)
    main(["plan", "show", str(out), "--lengths", "1024,2048", "--png", str(png)])
    report = json.loads(capsys.readouterr().out)
    assert [d["average_density"] for d in report["densities"]] == pytest.approx([0.25, 0.25], abs=2e-3)
    heads = plan.model.num_layers * plan.model.num_kv_heads
    assert report["rule_histogram"] == [{"alpha": -64, "beta": 0.25, "kv_heads": heads}]
    assert report["heatmap"] == {"png": str(png), "length": 2048}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
