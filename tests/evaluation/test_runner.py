"""Smoke of the evaluation harness end to end through the real engine (the full
run is `moa-vllm eval`, results in benchmarks/results/eval/)."""

from __future__ import annotations

import json
import re

import pytest
from moa_testing import model_fingerprint
from transformers import AutoTokenizer

from moa_vllm.evaluation.machine import CHECKOUT, provenance_lines, sha256
from moa_vllm.evaluation.runner import Method, effective_length, methods_from_args, run_eval
from moa_vllm.plan import uniform_plan
from moa_vllm.tasks import FILLERS, RECALL_FILLERS, RECALL_WORDINGS, is_correct, make_samples


def test_tasks_are_sized_seeded_and_carry_their_answer(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tasks = ["passkey", "lines", "needle", "recall"]
    samples = make_samples(tok, tasks, [300, 900], [0.0, 1.0], 2)
    again = make_samples(tok, tasks, [300, 900], [0.0, 1.0], 2)
    assert samples == again
    for task, fillers in (("passkey", FILLERS), ("needle", FILLERS),
                          ("recall", RECALL_FILLERS)):  # every filler kind at every length
        for n in (300, 900):
            assert {s.filler for s in samples if s.task == task and s.length == n} == set(
                fillers)
    # recall is completion style for every model: no chat turn, the prompt ends with
    # the fact's opening words
    leads = {lead for _, lead, _ in RECALL_WORDINGS}
    for s in samples:
        if s.task == "recall":
            assert "<|im_start|>" not in s.prompt
            assert any(s.prompt.endswith("\n" + lead) for lead in leads)
    assert len({s.prompt.split(s.answer)[0][-40:] for s in samples if s.task == "passkey"}) > 1
    for s in samples:
        n = len(tok(s.prompt)["input_ids"])
        assert 0.85 * s.length <= n <= 1.15 * s.length + 40, (s.task, s.length, n)
        assert s.answer in s.prompt and is_correct(s, f"it is {s.answer}.")
        assert not is_correct(s, "I do not know")


def test_effective_length_stops_at_the_first_miss():
    assert effective_length({512: 1.0, 1024: 0.95, 2048: 0.5, 4096: 1.0}) == 1024
    assert effective_length({512: 0.2}) == 0


def test_uniform_baselines_match_the_plans_density_at_every_length(tiny_dir, tmp_path):
    from moa_vllm.span_classes import average_density

    fp = model_fingerprint(tiny_dir)
    uniform_plan(fp, 0.5, elastic="position", grow=True).save(tmp_path / "pos.json")
    methods = methods_from_args(tiny_dir, [f"moa={tmp_path / 'pos.json'}"], [0.25])
    assert [m.name for m in methods] == ["dense", "uniform-0.25-position", "moa"]
    assert [m.path for m in methods] == [None, None, str(tmp_path / "pos.json")]
    baseline = methods[1].plan
    assert [round(average_density(baseline, n), 2) for n in (512, 1024, 2048)] == [0.25] * 3
    fixed = methods_from_args(tiny_dir, [], [0.25], uniform_length=512)[1]
    assert fixed.name == "uniform-0.25-fixed512" and fixed.plan.elastic == "position"
    assert methods_from_args(tiny_dir, [], [0.5])[1].plan.elastic == "prompt"


@pytest.fixture(scope="module")
def report(tiny_dir, tmp_path_factory):
    fp = model_fingerprint(tiny_dir)
    out = tmp_path_factory.mktemp("eval")
    uniform_plan(fp, 1.0).save(out / "full.json")
    methods = [
        Method("dense", None),
        Method("full", uniform_plan(fp, 1.0), path=str(out / "full.json")),
        Method("window", uniform_plan(fp, 0.25, length=512, sink_tokens=16, min_window=16)),
    ]
    return run_eval(tiny_dir, methods, ["passkey"], [256, 512], [0.5], 1, [512], 1, out), out


def test_harness_writes_results_and_a_full_plan_is_dense(report):
    data, out = report
    assert json.loads((out / "eval.json").read_text()) == data
    assert (out / "accuracy_vs_length.png").stat().st_size > 0
    assert (out / "accuracy_depth_heatmaps.png").stat().st_size > 0
    assert "| full | passkey |" in (out / "eval.md").read_text()
    dense, full, window = data["methods"]
    assert full["top1_agreement"]["512"] == 1.0 and full["kl_top20"]["512"] < 1e-4
    assert full["perplexity"]["512"] == pytest.approx(dense["perplexity"]["512"], rel=1e-3)
    # a 25% window on a 512-token text changes the next-token distributions
    assert window["kl_top20"]["512"] > 10 * full["kl_top20"]["512"]
    assert window["densities"]["512"]["average"] < 0.3
    # KV memory read from each engine's block pool in the same run
    for m in data["methods"]:
        assert set(m["kv_fraction"]) == {"256", "512"}
    assert dense["kv_fraction"]["512"] >= 0.99 and full["kv_fraction"]["512"] >= 0.99
    assert full["kv_fraction"]["512"] <= 1 + 16 / 256
    assert window["kv_fraction"]["512"] < 0.5 * full["kv_fraction"]["512"]
    assert "KV@512" in (out / "eval.md").read_text()


def test_the_report_names_machine_date_command_commit_and_plans(report):
    """eval.json and eval.md carry where the figures come from."""
    data, out = report
    record = data["provenance"]
    assert set(record) == {"machine", "gpu", "date", "command", "commit", "vllm", "plans"}
    assert re.search(r", \d+ cpus$", record["machine"]) and record["vllm"] and record["command"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", record["date"])
    if (CHECKOUT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(\+changes)?", record["commit"])
    assert record["plans"] == {str(out / "full.json"): sha256(out / "full.json")}
    assert data["dtype"] == "float32"
    markdown = (out / "eval.md").read_text()
    assert all(line in markdown for line in provenance_lines(record))
