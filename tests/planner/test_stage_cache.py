"""The plan search's stage cache: a stage's key is derived from its inputs, so an
option that changes what the MILP computes changes its key, one it does not read
leaves the key (and the cached result) alone; a stored result is returned without
computing it again."""

from dataclasses import replace

import numpy as np
import pytest

from moa_vllm.planner.lengths import resolve_lengths
from moa_vllm.planner.rules import Rule
from moa_vllm.planner.search_config import SearchConfig
from moa_vllm.planner.stage_cache import StageCache, key_hash
from moa_vllm.planner.stages import milp_inputs

BASE = SearchConfig(model="m", out="o", density=0.5, granule=64, sink_tokens=64)
RULES = [Rule(512, 0.0), Rule(-64, 0.5)]
LOSSES = np.random.default_rng(0).random((2, 3, 2, len(RULES)))


def milp_key(cfg: SearchConfig, rules=RULES, losses=LOSSES) -> str:
    return key_hash(milp_inputs(cfg, resolve_lengths(cfg, 8192), 3, rules, losses))


@pytest.mark.parametrize("option,value", [
    ("density", 0.375), ("allocated_density", 0.4), ("budget_slack", 0.1),
    ("block_size", 32), ("granule", 128), ("sink_tokens", 128), ("min_window", 128),
    ("elastic", "position"), ("exact_floor", 2048), ("pareto_grid", 3),
    ("time_limit", 60.0), ("mip_rel_gap", 1e-3),
])
def test_every_option_the_milp_reads_is_in_its_key(option, value):
    assert milp_key(replace(BASE, **{option: value})) != milp_key(BASE)


def test_the_rules_and_the_losses_are_in_the_milp_key():
    assert milp_key(BASE, rules=RULES[:1]) != milp_key(BASE)
    assert milp_key(BASE, losses=LOSSES * 2) != milp_key(BASE)


@pytest.mark.parametrize("option,value", [
    ("retrieval_samples", 4), ("retrieval_target", 0.9), ("max_validate", 2), ("seed", 3),
    ("answer_tokens", 32), ("progress", False), ("threads", 1),
])
def test_options_the_milp_does_not_read_leave_its_key(option, value):
    assert milp_key(replace(BASE, **{option: value})) == milp_key(BASE)


def test_a_stored_result_is_not_computed_again(tmp_path):
    calls = []

    def compute(value):
        calls.append(value)
        return {"v": value}, {"a": np.arange(3) * value}

    cache = StageCache(tmp_path)
    inputs = milp_inputs(BASE, resolve_lengths(BASE, 8192), 3, RULES, LOSSES)
    first = cache.get("milp", inputs, lambda: compute(1))
    again = StageCache(tmp_path).get("milp", inputs, lambda: compute(2))  # a resumed search
    other = cache.get("milp", replace(inputs, block_size=32), lambda: compute(3))
    assert calls == [1, 3]
    assert again[0] == first[0] == {"v": 1} and np.array_equal(again[1]["a"], [0, 1, 2])
    assert other[0] == {"v": 3}
