"""`moa-vllm plan search` end to end on the tiny random model, then a real engine."""

from __future__ import annotations

import json

import pytest

from moa_vllm.cli import build_parser
from moa_vllm.plan import load_plan
from moa_vllm.span_classes import allocated_density, assign_head_classes, average_density


def search_args(model_dir, tmp_path):
    return build_parser().parse_args([
        "plan", "search", "--model", str(model_dir), "--density", "0.5",
        "--lengths", "256,512", "--validate-lengths", "224,768", "--samples", "2,1",
        "--exact-floor", "192",
        "--validate-samples", "2,1", "--answer-tokens", "16", "--threads", "2",
        "--retrieval-samples", "2",
        "--work-dir", str(tmp_path / "work"), "--no-progress",
        "--out", str(tmp_path / "tiny-moa.json"),
    ])


def generate_with(model_dir, plan, tmp_path, **options) -> int:
    from vllm import SamplingParams

    from moa_testing import start_llm, stop_llm

    llm = start_llm(model_dir, plan, tmp_path, **options)
    try:
        res = llm.generate(["The quick brown fox " * 40], SamplingParams(max_tokens=4, temperature=0))
        return len(res[0].outputs[0].token_ids)
    finally:
        stop_llm(llm)


def test_plan_search_end_to_end(tiny_dir, tmp_path):
    out = tmp_path / "tiny-moa.json"
    args = search_args(tiny_dir, tmp_path)
    args.func(args)
    plan = load_plan(out)
    details = plan.provenance.details
    assert plan.provenance.method == "moa-search"
    assert set(details["stage_seconds"]) >= {"profile_256", "profile_512", "milp", "validation"}
    assert details["solver"]["solves"]
    # chosen on a shorter and a longer unseen length, dense and the equal-density
    # uniform window scored beside the searched plans
    assert sorted(details["validation"]["per_length"]) == ["224", "768"]
    for v in details["validation"]["per_length"].values():
        assert v["chosen_loss"] >= 0.0 and v["uniform_loss"] >= 0.0 and v["dense_loss"] >= 0.0
    # recall scored at the same lengths for the given density, dense beside it
    retrieval = details["retrieval"]
    assert retrieval["lengths"] == [224, 768] and retrieval["prompts"] == 4
    assert retrieval["density_chosen_by"] == "given"
    assert [step["density"] for step in retrieval["sweep"]] == [0.5]
    assert 0 <= retrieval["sweep"][0]["solved"] <= 4
    # budgets from where sinks + min_window are half the budget: (64 + 64) * 2 / 0.5
    assert details["density_lengths"][0] == 512
    # prompts up to the floor exact (density 1), the rules beyond
    assert plan.exact_floor == 192
    assert average_density(plan, 192) == allocated_density(plan, 192, 16) == 1.0
    assert average_density(plan, 512) < 1.0
    # one rule per head class: the block pool holds the average density
    assert plan.head_classes is not None
    assert all(len(c.rules) == 1 for c in assign_head_classes(plan))
    for n in details["density_lengths"]:
        # spent within the slack at every length, never above it
        assert 0.5 - details["budget_slack"] - 1e-9 <= average_density(plan, n) <= 0.5 + 1e-9
        assert abs(allocated_density(plan, n, 16) - average_density(plan, n)) <= 16 / n
    json.dumps(details)

    # resumable: a second run reuses every stage
    args.func(args)
    again = load_plan(out)
    assert again.rules == plan.rules
    assert "profile_256" not in again.provenance.details["stage_seconds"]

    assert generate_with(tiny_dir, plan, tmp_path) == 4


def test_density_auto_keeps_the_lowest_budget_that_recalls(smollm2_dir, tmp_path):
    """SmolLM2 at 768 tokens: a 0.1 budget's windows cannot reach facts before the
    prompt's last hundred tokens, so the sweep goes on to 0.9, which recalls what
    dense does; both steps, dense's count and the uniform window's land in
    provenance."""
    out = tmp_path / "auto.json"
    args = build_parser().parse_args([
        "plan", "search", "--model", str(smollm2_dir), "--densities", "0.9,0.1",
        "--lengths", "512", "--samples", "1", "--validate-lengths", "768",
        "--validate-samples", "1", "--exact-floor", "256", "--sink-tokens", "16",
        "--min-window", "16", "--granule", "16", "--answer-tokens", "8",
        "--retrieval-samples", "3", "--retrieval-target", "0.6", "--pareto-grid", "1",
        "--max-validate", "2", "--time-limit", "10", "--budget-slack", "1", "--threads", "2",
        "--no-progress",
        "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert args.density == "auto"
    args.func(args)
    plan = load_plan(out)
    details = plan.provenance.details
    retrieval = details["retrieval"]
    assert retrieval["density_chosen_by"] == "auto" and retrieval["dense_solved"] >= 2
    low, high = retrieval["sweep"]
    assert (low["density"], high["density"]) == (0.1, 0.9) and details["density"] == 0.9
    assert not low["meets_target"] and low["solved"] < 0.6 * retrieval["dense_solved"]
    assert high["meets_target"] and high["solved"] >= 0.6 * retrieval["dense_solved"]
    assert 0 <= high["uniform_solved"] <= 3 and "uniform_solved" not in low
    assert average_density(plan, 768) > 0.5


def test_density_auto_needs_retrieval_dense_can_do(tiny_dir, tmp_path):
    """A random model recalls nothing, so no density can be chosen by recall: one
    clear error, no plan written."""
    args = search_args(tiny_dir, tmp_path)
    args.density = "auto"
    with pytest.raises(RuntimeError, match="dense retrieves none"):
        args.func(args)
    assert not (tmp_path / "tiny-moa.json").exists()


def test_plan_search_on_qwen3(tiny_model_of, tmp_path):
    """Profiling sees attention after Qwen3's q/k norms (the attention interface)."""
    model_dir = tiny_model_of("qwen3")
    args = search_args(model_dir, tmp_path)
    args.func(args)
    plan = load_plan(tmp_path / "tiny-moa.json")
    assert plan.model.architecture == "Qwen3ForCausalLM"
    assert plan.provenance.details["validation"]["excess_vs_uniform"] is not None
    assert generate_with(model_dir, plan, tmp_path) == 4


def test_plan_search_on_a_hybrid_model(tiny_model_of, tmp_path):
    """A model that windows some layers itself (tiny Gemma 3): only the full layers
    get rules; profiling and validation run the windowed layers with their window;
    the plan serves."""
    model_dir = tiny_model_of("gemma3")
    args = search_args(model_dir, tmp_path)
    args.func(args)
    plan = load_plan(tmp_path / "tiny-moa.json")
    assert plan.model.windowed_layers == [0, 2]
    assert [row is None for row in plan.rules] == [True, False, True, False]
    assert [row is None for row in plan.head_classes] == [True, False, True, False]
    assert sorted(s for c in assign_head_classes(plan) for s in c.kv_heads) == [
        (1, 0), (1, 1), (3, 0), (3, 1)]
    assert average_density(plan, 512) < 1.0
    assert plan.provenance.details["validation"]["excess_vs_uniform"] is not None
    # vLLM's CPU op runs the windowed layers' blocks of 32 tokens (two KV heads)
    assert generate_with(model_dir, plan, tmp_path, block_size=64) == 4


def test_default_lengths_span_windowed_prompts_to_the_context():
    """From just above the exact floor (1024 by default) to the context."""
    from moa_vllm.planner.lengths import resolve_lengths
    from moa_vllm.planner.search_config import SearchConfig

    lengths = resolve_lengths(SearchConfig(model="m", density=0.5, out="o"), 8192)
    assert lengths.profile == [1024, 2048, 4096]
    assert lengths.validate == [1152, 1536, 6144]  # unseen: just past the floor, between, longer
    assert lengths.validate_samples[0] > lengths.validate_samples[-1] >= 2
    assert lengths.density[0] == 1152 and lengths.density[-1] == 8192
    assert set(lengths.profile[1:] + lengths.validate) <= set(lengths.density)  # not 1024
    long = resolve_lengths(SearchConfig(model="m", density=0.5, out="o"), 131072)
    assert long.profile[-1] == 16384 and long.validate[-1] == 24576
    assert resolve_lengths(SearchConfig(model="m", density=0.5, out="o",
                                        validate_lengths=[]), 8192).validate == []
    # without a floor: from 512, budgets where sinks + min_window are half the budget
    no_floor = resolve_lengths(SearchConfig(model="m", density=0.5, out="o", exact_floor=0),
                               8192)
    assert no_floor.profile == [512, 1024, 2048, 4096]
    assert no_floor.validate == [384, 768, 6144] and no_floor.density[0] == 512
    assert resolve_lengths(SearchConfig(model="m", density=0.25, out="o", exact_floor=0),
                           8192).density[0] == 1024
    with pytest.raises(ValueError, match="validation lengths above it"):
        resolve_lengths(SearchConfig(model="m", density=0.5, out="o",
                                     validate_lengths=[768, 2048]), 8192)


def test_choose_takes_the_plan_that_holds_at_every_length():
    """A plan far better at long prompts but worse than the uniform window at short
    ones loses to one a little better everywhere."""
    from moa_vllm.planner.selection import LengthScores, choose

    scores = {384: LengthScores(0.3, 1.0, [1.05, 0.98]), 6144: LengthScores(0.7, 0.8, [0.5, 0.78])}
    best, worst = choose(scores)
    assert best == 1
    assert worst == pytest.approx([0.75 / 0.7, 0.68 / 0.7])


def test_choose_weighs_excess_over_dense_not_loss_over_uniform():
    """The SmolLM2 0.5 search's validation (2026-12-02): plan 0 matches dense at 6144
    tokens but keeps a third of the uniform window's excess at 384; plan 1 keeps an
    eighth there and gives up a little at 6144, where the uniform window itself is
    near dense. A ratio to the uniform window's loss picked plan 0."""
    from moa_vllm.planner.selection import LengthScores, choose

    scores = {384: LengthScores(0.359, 1.135, [0.618, 0.460]),
              768: LengthScores(0.390, 0.797, [0.545, 0.473]),
              6144: LengthScores(0.712, 0.792, [0.701, 0.740])}
    best, worst = choose(scores)
    assert best == 1 and worst[1] < worst[0]
    # a uniform window as good as dense: excess measured against a floor, not zero
    same = {384: LengthScores(0.359, 1.135, [0.618, 0.460]),
            6144: LengthScores(0.712, 0.712, [0.701, 0.740])}
    best, worst = choose(same)
    assert best == 0 and worst[1] == pytest.approx(0.028 / (0.05 * 0.712))
