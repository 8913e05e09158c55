"""The MILP respects every constraint and beats a uniform assignment."""

from __future__ import annotations

import numpy as np
import pytest

from moa_vllm.plan import PLAN_VERSION, ModelFingerprint, Plan, Provenance, now_iso
from moa_vllm.planner.milp import HeadClassMILP, pareto_sweep
from moa_vllm.planner.rules import Rule, default_rules, dropped_fraction, rule_held_blocks
from moa_vllm.planner.synthetic import random_problem
from moa_vllm.span_classes import (
    allocated_density,
    assign_head_classes,
    average_density,
    single_rule_classes,
)
from moa_vllm.span_mask import LayerSpans, SpanParams

CTX = 2048
LENGTHS = [512, 1024]
DENSITY_LENGTHS = [512, 1024, 1536, 2048]


def _plan(layers, heads, rules, choice, classes=None, elastic="position"):
    fp = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=layers, num_attention_heads=heads,
                          num_kv_heads=heads, head_dim=16, max_position_embeddings=CTX)
    table = [[rules[r].as_tuple() for r in row] for row in choice]
    return Plan(version=PLAN_VERSION, model=fp, sink_tokens=64, elastic=elastic, min_window=64,
                max_head_classes=classes or 1, rules=table,
                head_classes=None if classes is None else single_rule_classes(table, classes, CTX, 64),
                provenance=Provenance(method="test", created=now_iso()))


def _verifier(prob, layers, heads, rules):
    def verify(choice):
        plan = _plan(layers, heads, rules, choice, prob.num_classes)
        return all(average_density(plan, n) <= avg + 1e-9
                   and allocated_density(plan, n, 16) <= alloc + 1e-9
                   for n, avg, alloc in zip(DENSITY_LENGTHS, prob.density_budget,
                                            prob.allocated_budget))

    return verify


def _check(prob, plan, density):
    """Budgets hold where they can; each class holds one rule, so the block pool's
    density is the average density (within block rounding)."""
    for n in DENSITY_LENGTHS:
        avg = average_density(plan, n)
        assert avg <= density + 1e-9 or avg <= prob.dens[:, DENSITY_LENGTHS.index(n)].min() + 1e-9
        assert allocated_density(plan, n, 16) == pytest.approx(
            sum(rule_held_blocks(Rule(a, b), n, SpanParams(64, 64, "position"), 16)
                for row in plan.rules for a, b in row) / (len(plan.rules) * len(plan.rules[0]) * -(-n // 16)))
        assert abs(allocated_density(plan, n, 16) - avg) <= 16 / n + 1e-9
    classes = assign_head_classes(plan)
    assert len(classes) == prob.num_classes
    assert all(len(c.rules) == 1 for c in classes)
    assert len({len(c.kv_heads) for c in classes}) == 1


@pytest.mark.parametrize(
    "layers,heads,density,seed,classes",
    [(8, 2, 0.5, 0, 4), (8, 2, 0.3, 1, 8), (6, 3, 0.5, 2, 1), (4, 2, 0.4, 3, 4), (12, 2, 0.5, 4, 6)],
)
def test_milp_constraints_and_uniform(layers, heads, density, seed, classes):
    prob, rules = random_problem(layers, heads, LENGTHS, DENSITY_LENGTHS, density, CTX, seed=seed,
                                 max_head_classes=classes)
    assert prob.num_classes == classes
    verify = _verifier(prob, layers, heads, rules)
    program = HeadClassMILP(prob, verify, time_limit=20, mip_rel_gap=1e-4)
    sol = program.solve(np.array([0.0, 1.0]))
    assert sol.status == 0 and sol.info["verified"]
    _check(prob, _plan(layers, heads, rules, sol.choice, classes), density)
    # the best uniform assignment (every head the same rule) that meets the budgets
    best_uniform = np.inf
    for r in range(len(rules)):
        uni = np.full((layers, heads), r)
        if verify(uni):
            best_uniform = min(best_uniform, prob.losses[1][..., r].sum())
    assert np.isfinite(best_uniform)
    assert sol.objectives[1] <= best_uniform * (1 + 1e-3)
    if classes > 1:
        assert sol.objectives[1] < best_uniform  # heterogeneous spans help on random profiles


def test_budget_floor_at_short_lengths():
    """At 256 tokens sinks + min_window are half the cache: a 0.25 budget is met at
    its floor (every head at min_window), not made infeasible."""
    lengths = [256, *DENSITY_LENGTHS]
    prob, rules = random_problem(4, 2, LENGTHS, lengths, 0.25, CTX, seed=5, max_head_classes=4)
    floor = prob.dens[:, 0].min()
    assert prob.density_budget[0] == floor > 0.45
    sol = HeadClassMILP(prob, None, time_limit=20).solve(np.array([0.0, 1.0]))
    assert sol.status == 0
    plan = _plan(4, 2, rules, sol.choice, 4)
    assert average_density(plan, 256) == pytest.approx(floor)
    assert average_density(plan, 2048) <= 0.25 + 1e-9


def test_the_budget_is_spent_at_every_length():
    """With a slack the plan's density lies in [budget - slack, budget] at every
    length of interest; without, this profile's optimum leaves budget unused."""
    density = 0.5
    prob, rules = random_problem(4, 2, LENGTHS, DENSITY_LENGTHS, density, CTX, seed=6,
                                 max_head_classes=4)
    unused = HeadClassMILP(prob, None, time_limit=20).solve(np.array([0.0, 1.0]))
    assert min(average_density(_plan(4, 2, rules, unused.choice, 4), n)
               for n in DENSITY_LENGTHS) < density - 0.05
    prob.budget_slack = 0.05
    sol = HeadClassMILP(prob, None, time_limit=20).solve(np.array([0.0, 1.0]))
    assert sol.status == 0
    plan = _plan(4, 2, rules, sol.choice, 4)
    for n in DENSITY_LENGTHS:
        assert density - 0.05 - 1e-9 <= average_density(plan, n) <= density + 1e-9


def test_single_rule_classes_need_multiples_of_the_class_size():
    rules = [Rule(128, 0.0), Rule(0, 0.5)]
    choice = np.array([[0, 1], [1, 1], [0, 0], [1, 0]])  # 4 + 4 slots: classes of 2 or 4
    table = [[rules[r].as_tuple() for r in row] for row in choice]
    assert sorted(c for row in single_rule_classes(table, 4, CTX, 64) for c in row) == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="multiple of 8"):
        single_rule_classes(table, 1, CTX, 64)  # one class cannot hold two rules


def test_pareto_front_is_feasible_and_nondominated():
    layers, heads, density = 8, 2, 0.5
    prob, rules = random_problem(layers, heads, LENGTHS, DENSITY_LENGTHS, density, CTX, seed=7,
                                 max_head_classes=4)
    program = HeadClassMILP(prob, _verifier(prob, layers, heads, rules), time_limit=20,
                            mip_rel_gap=1e-4)
    front, log = pareto_sweep(program, grid=2, progress=False)
    assert front and len(log) >= 3
    for s in front:
        _check(prob, _plan(layers, heads, rules, s.choice, 4), density)
        for o in front:
            assert not ((o.objectives <= s.objectives).all() and (o.objectives < s.objectives).any())


@pytest.mark.parametrize("rule", [Rule(100, 0.0), Rule(0, 0.25), Rule(-256, 0.75), Rule(64, 0.5)])
@pytest.mark.parametrize("elastic", ["position", "prompt"])
@pytest.mark.parametrize("granule", [1, 16])
def test_dropped_fraction_is_the_runtime_mask(rule, elastic, granule):
    import torch

    length, block, sink, minw = 320, 32, 16, 24
    params = SpanParams(sink, minw, elastic, granule)
    frac = dropped_fraction(rule, length, block, params, prompt_len=300)
    spans = LayerSpans(alpha=torch.tensor([rule.alpha]), beta_q=torch.tensor([rule.beta_q]),
                       params=params)

    pos = torch.arange(length)
    n = pos + 1 if elastic == "position" else torch.full_like(pos, 300)
    keep = spans.mask(pos, pos, n)[0].numpy()
    causal = np.tril(np.ones((length, length), bool))
    nb = length // block
    dropped = (causal & ~keep).reshape(nb, block, nb, block).sum((1, 3))
    total = causal.reshape(nb, block, nb, block).sum((1, 3))
    ref = np.where(total > 0, dropped / np.maximum(total, 1), 0)
    np.testing.assert_allclose(frac, ref)


def test_default_rules_scale_with_context():
    rules = default_rules(8192, SpanParams(64, 64, "position"), density=0.3)
    assert 40 <= len(rules) <= 56
    assert Rule(8192, 0.0) in rules and Rule(-64, 1.0) in rules
    # the equal-density uniform window is in the grid (also off the 1/8 steps)
    assert Rule(-64, 0.5) in rules and Rule(-64, 0.3) in rules
    assert all(r.alpha + r.beta * 8192 > 64 for r in rules)


def test_plan_heatmap(tmp_path):
    from moa_vllm.planner.plots import plan_heatmap, span_matrix

    rules = [Rule(128, 0.0), Rule(0, 0.5)]
    plan = _plan(4, 2, rules, np.array([[0, 1], [1, 1], [0, 0], [1, 0]]))
    m = span_matrix(plan, 1024)
    assert m.shape == (4, 2)
    assert np.isclose(m.mean(), average_density(plan, 1024))
    plan_heatmap(plan, 1024, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 1000
