import random

import pytest

from moa_vllm.plan import PLAN_VERSION, ModelFingerprint, Plan, Provenance
from moa_vllm.span_classes import (
    allocated_density,
    assign_span_classes,
    average_density,
    cdiv,
    num_span_classes,
)
from moa_vllm.span_mask import quantize_beta, window_size


def random_plan(num_layers=30, num_kv_heads=3, seed=0, elastic="position") -> Plan:
    rng = random.Random(seed)
    fp = ModelFingerprint(
        architecture="LlamaForCausalLM", num_layers=num_layers, num_attention_heads=9,
        num_kv_heads=num_kv_heads, head_dim=64, max_position_embeddings=8192,
    )
    rules = [
        [(rng.choice([-512, 0, 256, 1024]), rng.choice([0.0, 0.125, 0.5, 1.0]))
         for _ in range(num_kv_heads)]
        for _ in range(num_layers)
    ]
    return Plan(version=PLAN_VERSION, model=fp, sink_tokens=64, elastic=elastic,
                min_window=128, rules=rules,
                provenance=Provenance(method="test", created="now"))


@pytest.mark.parametrize("layers, k_max, expected", [(30, 4, 3), (30, 2, 2), (4, 4, 4), (7, 4, 1)])
def test_class_count_divides_layers(layers, k_max, expected):
    assert num_span_classes(layers, k_max) == expected


def test_classes_partition_layers_equally_and_hold_their_rules():
    plan = random_plan()
    classes = assign_span_classes(plan, 4)
    layers = sorted(layer for c in classes for layer in c.layers)
    assert layers == list(range(30))
    assert {len(c.layers) for c in classes} == {10}
    for c in classes:
        for layer in c.layers:
            for alpha, beta in plan.rules[layer]:
                assert (alpha, quantize_beta(beta)) in c.rules


def brute_force_held_blocks(plan, layers, length, block_size):
    """Blocks any head of these layers still reads for the next query (t = length)."""
    needed = set()
    for layer in layers:
        for alpha, beta in plan.rules[layer]:
            n = length + 1 if plan.elastic == "position" else length
            w = window_size(alpha, quantize_beta(beta), n, plan.min_window)
            for j in range(length):
                if j < plan.sink_tokens or length - j < w:
                    needed.add(j // block_size)
    return needed


@pytest.mark.parametrize("elastic", ["position", "prompt"])
@pytest.mark.parametrize("length", [100, 1000, 3000, 8000])
def test_held_blocks_cover_every_needed_block(elastic, length):
    plan = random_plan(seed=1, elastic=elastic)
    bs = 16
    for c in assign_span_classes(plan, 3):
        needed = brute_force_held_blocks(plan, c.layers, length, bs)
        first, last = c.dead_blocks(length, length, bs)
        dead = set(range(first, last))
        assert not needed & dead  # never frees a block some head reads
        # ...and frees everything between the sinks and the widest window
        assert c.held_blocks(length, length, bs) == cdiv(length, bs) - len(dead)
        assert c.held_blocks(length, length, bs) <= len(needed) + 1


def test_densities_of_a_uniform_window():
    from moa_vllm.plan import uniform_plan

    plan = uniform_plan(random_plan().model, 0.25, length=4096, sink_tokens=64, min_window=64)
    assert abs(average_density(plan, 4096) - 0.25) < 0.01
    assert abs(allocated_density(plan, 4096, 16) - 0.25) < 0.01
    # window 960 + 64 sinks: the next query (t=1024) no longer reads position 64
    assert average_density(plan, 1024) == 1023 / 1024
