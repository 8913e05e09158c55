"""The MILP respects every constraint and beats a uniform assignment."""

from __future__ import annotations

import numpy as np
import pytest

from moa_vllm.plan import PLAN_VERSION, ModelFingerprint, Plan, Provenance, now_iso
from moa_vllm.planner.milp import Assigner, pareto_sweep
from moa_vllm.planner.rules import Rule, default_rules, dropped_fraction
from moa_vllm.planner.synthetic import random_problem
from moa_vllm.span_classes import allocated_density, assign_head_classes, average_density
from moa_vllm.span_mask import LayerSpans

CTX = 2048
LENGTHS = [512, 1024]
DENSITY_LENGTHS = [512, 1024, 1536, 2048]


def _plan(layers, heads, rules, choice, elastic="position"):
    fp = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=layers, num_attention_heads=heads,
                          num_kv_heads=heads, head_dim=16, max_position_embeddings=CTX)
    return Plan(version=PLAN_VERSION, model=fp, sink_tokens=64, elastic=elastic, min_window=64,
                max_span_classes=4, rules=[[rules[r].as_tuple() for r in row] for row in choice],
                provenance=Provenance(method="test", created=now_iso()))


def _check(plan, density, max_rules=2, max_classes=4, block_size=16):
    for n in DENSITY_LENGTHS:
        assert average_density(plan, n) <= density + 1e-9, n
        assert allocated_density(plan, n, block_size) <= density + 1e-9, n
    for row in plan.rules:
        assert len(row) == plan.model.num_kv_heads  # one rule per KV head
        assert len(set(row)) <= max_rules
    assert len(assign_head_classes(plan, max_classes=max_classes)) <= max_classes


def _verifier(layers, heads, rules, density):
    def verify(choice):
        plan = _plan(layers, heads, rules, choice)
        return all(average_density(plan, n) <= density + 1e-9
                   and allocated_density(plan, n, 16) <= density + 1e-9 for n in DENSITY_LENGTHS)

    return verify


@pytest.mark.parametrize(
    "layers,heads,density,seed,classes",
    [(8, 2, 0.5, 0, 4), (8, 2, 0.3, 1, 4), (6, 3, 0.5, 2, 1), (4, 2, 0.4, 3, 4), (12, 2, 0.5, 4, 4)],
)
def test_milp_constraints_and_uniform(layers, heads, density, seed, classes):
    prob, rules = random_problem(layers, heads, LENGTHS, DENSITY_LENGTHS, density, CTX, seed=seed,
                                 max_span_classes=classes)

    verify = _verifier(layers, heads, rules, density)
    assigner = Assigner(prob, verify, time_limit=20, mip_rel_gap=1e-4)
    w = np.array([0.0, 1.0])
    sol = assigner.solve(w)
    assert sol.status == 0 and sol.info["verified"]
    plan = _plan(layers, heads, rules, sol.choice)
    _check(plan, density)
    # the best uniform assignment (every head the same rule) that meets the budgets
    best_uniform = np.inf
    for r in range(len(rules)):
        uni = np.full((layers, heads), r)
        if verify(uni):
            best_uniform = min(best_uniform, prob.losses[1][..., r].sum())
    assert np.isfinite(best_uniform)
    assert sol.objectives[1] <= best_uniform * (1 + 1e-3)
    assert sol.objectives[1] < best_uniform  # heterogeneous spans help on random profiles


def test_pareto_front_is_feasible_and_nondominated():
    layers, heads, density = 8, 2, 0.5
    prob, rules = random_problem(layers, heads, LENGTHS, DENSITY_LENGTHS, density, CTX, seed=7)
    assigner = Assigner(prob, _verifier(layers, heads, rules, density), time_limit=20, mip_rel_gap=1e-4)
    front, log = pareto_sweep(assigner, grid=2, progress=False)
    assert front and len(log) >= 4
    for s in front:
        _check(_plan(layers, heads, rules, s.choice), density)
        for o in front:
            assert not ((o.objectives <= s.objectives).all() and (o.objectives < s.objectives).any())


@pytest.mark.parametrize("rule", [Rule(100, 0.0), Rule(0, 0.25), Rule(-256, 0.75), Rule(64, 0.5)])
@pytest.mark.parametrize("elastic", ["position", "prompt"])
def test_dropped_fraction_is_the_runtime_mask(rule, elastic):
    length, block, sink, minw = 320, 32, 16, 24
    frac = dropped_fraction(rule, length, block, sink, minw, elastic, prompt_len=300)
    spans = LayerSpans(alpha=__import__("torch").tensor([rule.alpha]),
                       beta_q=__import__("torch").tensor([rule.beta_q]),
                       sink_tokens=sink, min_window=minw, elastic=elastic)
    import torch

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
    rules = default_rules(8192, 64, sink_tokens=64, density=0.3)
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
