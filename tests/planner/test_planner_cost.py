"""The search's memory estimate against profiling's measured peak on the tiny
model (a smoke of benchmarks/planner_memory.py; the 8B-shape run is committed in
benchmarks/results/), and that `plan search` prints it before it starts."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest
from moa_testing import ROOT

# the estimate counts every tensor profiling holds (planner.cost); what it leaves
# out (kernels' workspaces, the allocator's rounding) or counts twice (gradients
# freed while others are made) stays within this factor of the measured peak
FACTOR = 1.5


@pytest.fixture(scope="module")
def measured(tiny_dir, tmp_path_factory):
    """Peak bytes over the weights of profiling one 2048-token sample on the tiny
    model cut to 2 and to all 4 of its layers (one fresh process each)."""
    out = tmp_path_factory.mktemp("planner_memory") / "smoke"
    result = subprocess.run(
        [sys.executable, "-P", str(ROOT / "benchmarks" / "planner_memory.py"), "--shape",
         str(tiny_dir), "--layers", "2,4", "--lengths", "2048", "--dtype", "float32",
         "--threads", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "extrapolated" in out.with_suffix(".md").read_text()
    return json.loads(out.with_suffix(".json").read_text())


def test_estimate_within_a_factor_of_the_measured_peak(measured):
    rows = measured["rows"]
    assert [(r["layers"], r["length"]) for r in rows] == [(2, 2048), (4, 2048)]
    for r in rows:
        assert r["estimated_bytes"] / FACTOR <= r["peak_bytes"] <= r["estimated_bytes"] * FACTOR, r


def test_profiling_memory_is_bounded_per_layer(measured):
    """A layer adds its input hidden states (one checkpoint), not its activations:
    the peak of 4 layers exceeds that of 2 by about one checkpoint per layer, a
    small part of the peak (holding one layer's activations each would be half)."""
    (two, four), (step,) = measured["rows"], measured["per_layer"]
    checkpoint = (four["estimated_parts"]["checkpoints"]
                  - two["estimated_parts"]["checkpoints"]) / 2
    assert checkpoint / FACTOR <= step["layer_bytes"] <= checkpoint * FACTOR
    assert step["layer_bytes"] < two["peak_bytes"] / 8


def test_plan_search_prints_the_estimate_first(tiny_dir, tmp_path, caplog, measured):
    """`plan search` logs the peak memory and time before any stage runs; for the
    whole tiny model profiling 2048 tokens the peak is the measured one (over the
    weights) plus the weights, within the factor."""
    from moa_vllm.planner.pipeline import start
    from moa_vllm.planner.search_config import SearchConfig

    caplog.set_level(logging.INFO, logger="moa_vllm.planner")
    run = start(SearchConfig(model=str(tiny_dir), density=0.5, out=str(tmp_path / "p.json"),
                              lengths=[2048], validate_lengths=[1536], samples=[1],
                              work_dir=str(tmp_path / "work")))
    assert not run._loaded and not run.cache.seconds  # nothing loaded or computed yet
    line = next(m for m in caplog.messages if m.startswith("estimate on cpu (float32)"))
    peak = float(re.search(r"peak memory ([\d.]+) GiB", line).group(1)) * 2**30
    assert re.search(r"time about \d+ min \(calibration [\d.]+, profiling [\d.]+, validation",
                     line)
    four = measured["rows"][-1]
    total = four["peak_bytes"] + four["estimated_parts"]["weights"]
    assert total / FACTOR <= peak <= total * FACTOR, (line, total)
