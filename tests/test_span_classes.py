import random
from pathlib import Path

import pytest

from moa_vllm.plan import PLAN_VERSION, ModelFingerprint, Plan, Provenance, uniform_plan
from moa_vllm.span_classes import (
    allocated_density,
    assign_head_classes,
    average_density,
    cdiv,
    head_classes,
    num_head_classes,
    objective_lengths,
    kv_head_rules,
)
from moa_vllm.span_mask import quantize_beta, window_size


ROOT = Path(__file__).resolve().parent.parent


def random_plan(num_layers=30, num_kv_heads=3, seed=0, elastic="position", granule=1) -> Plan:
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
                min_window=128, granule=granule, rules=rules,
                provenance=Provenance(method="test", created="now"))


@pytest.mark.parametrize("items, k_max, expected", [(30, 4, 3), (30, 2, 2), (4, 4, 4), (7, 4, 1),
                                                     (90, 9, 9), (90, 10, 10)])
def test_class_count_divides_the_slots(items, k_max, expected):
    assert num_head_classes(items, k_max) == expected


@pytest.mark.parametrize("k", [1, 3, 9, 10])
def test_classes_partition_slots_equally_and_hold_their_rules(k):
    plan = random_plan()
    classes = assign_head_classes(plan, max_classes=k)
    slots = sorted(s for c in classes for s in c.kv_heads)
    assert slots == [(layer, h) for layer in range(30) for h in range(3)]
    assert len(classes) == k and {len(c.kv_heads) for c in classes} == {90 // k}
    for c in classes:
        for layer, head in c.kv_heads:
            alpha, beta = plan.rules[layer][head]
            assert (alpha, quantize_beta(beta)) in c.rules


def total_held(plan, classes, n, bs=16):
    return sum(c.held_blocks(n, n, bs) for c in classes)


@pytest.mark.parametrize("seed", range(4))
def test_head_classes_never_hold_more_than_layer_classes(seed):
    """The layer classes the runtime formed before head classes (layers sorted by
    their widest window) are a ceiling at every objective length."""
    plan = random_plan(seed=seed)
    ours = assign_head_classes(plan, max_classes=9)  # gcd(9, 30) = 3 layer classes
    widest = sorted(range(30), key=lambda layer: max(
        window_size(a, quantize_beta(b), 8192, plan.min_window) for a, b in plan.rules[layer]))
    layer_classes = [sorted(widest[c * 10:(c + 1) * 10]) for c in range(3)]
    assignment = [[next(i for i, c in enumerate(layer_classes) if layer in c)] * 3
                  for layer in range(30)]
    before = head_classes(plan, assignment)
    for n in objective_lengths(8192):
        # per slot: 3 layer classes of 30 slots hold 30 x their blocks; 9 of 10 hold 10 x
        assert 10 * total_held(plan, ours, n) <= 30 * total_held(plan, before, n), n


def test_swaps_beat_the_sorted_cut_on_a_per_head_plan():
    """A plan without its own classes (searched for layer classes, shipped until
    2026-12): the derived assignment."""
    from moa_vllm.plan import load_plan

    plan = load_plan(ROOT / "tests" / "data" / "smollm2-135m-per-head-layer-classes.json")
    classes = assign_head_classes(plan, max_classes=9)
    rules = kv_head_rules(plan)
    order = sorted(rules, key=lambda s: (max(window_size(a, b, 8192, plan.min_window)
                                             for a, b in rules[s]), s))
    cut = [[0] * 3 for _ in range(30)]
    for i, (layer, h) in enumerate(order):
        cut[layer][h] = i // 10
    sorted_cut = head_classes(plan, cut)
    lengths = objective_lengths(8192)
    assert sum(total_held(plan, classes, n) / cdiv(n, 16) for n in lengths) < sum(
        total_held(plan, sorted_cut, n) / cdiv(n, 16) for n in lengths)
    assert allocated_density(plan, 2048, 16, classes) < 0.75  # layer classes: 1.00


def test_a_plans_own_assignment_is_served():
    plan = random_plan(num_layers=4, num_kv_heads=2)
    assignment = [[0, 1], [1, 0], [0, 1], [1, 0]]
    plan = plan.model_copy(update={"head_classes": assignment})
    classes = assign_head_classes(plan)
    assert [c.kv_heads for c in classes] == [((0, 0), (1, 1), (2, 0), (3, 1)),
                                          ((0, 1), (1, 0), (2, 1), (3, 0))]


def test_tensor_parallel_slots_hold_the_rules_of_every_rank():
    plan = random_plan(num_layers=2, num_kv_heads=4)
    rules = kv_head_rules(plan, tp_size=2)
    assert sorted(rules) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for (layer, j), held in rules.items():
        expected = {(a, quantize_beta(b)) for a, b in (plan.rules[layer][j],
                                                       plan.rules[layer][2 + j])}
        assert set(held) == expected


def brute_force_held_blocks(plan, slots, length, block_size):
    """Blocks any of these slots' heads still reads for the next query (t = length)."""
    needed = set()
    for layer, head in slots:
        for alpha, beta in [plan.rules[layer][head]]:
            n = length + 1 if plan.elastic == "position" else length
            w = window_size(alpha, quantize_beta(beta), n, plan.min_window)
            start = (length - w + 1) // plan.granule * plan.granule  # floor
            for j in range(length):
                if j < plan.sink_tokens or j >= start:
                    needed.add(j // block_size)
    return needed


@pytest.mark.parametrize("elastic", ["position", "prompt"])
@pytest.mark.parametrize("length", [100, 1000, 3000, 8000])
@pytest.mark.parametrize("granule", [1, 64])
def test_held_blocks_cover_every_needed_block(elastic, length, granule):
    plan = random_plan(seed=1, elastic=elastic, granule=granule)
    bs = 16
    for c in assign_head_classes(plan, max_classes=9):
        needed = brute_force_held_blocks(plan, c.kv_heads, length, bs)
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


@pytest.mark.parametrize("elastic", ["position", "prompt"])
def test_exact_floor_holds_everything_up_to_it(elastic):
    """Densities (what heads read, what the block pool holds) are 1 up to the floor
    and the plan's own beyond it; a prompt-elastic request under the floor keeps
    every block through its decode too."""
    plain = uniform_plan(random_plan().model, 0.25, elastic=elastic, grow=True, granule=64)
    floored = uniform_plan(plain.model, 0.25, elastic=elastic, grow=True, granule=64,
                           exact_floor=1024)
    # the next query of an n-token request has N = n (prompt) or n + 1 (position)
    for n in (512, 1024 if elastic == "prompt" else 1023):
        assert average_density(floored, n) == allocated_density(floored, n, 16) == 1.0
        assert allocated_density(plain, n, 16) < 0.5  # the floor did something
    for n in (1088, 4096):
        assert allocated_density(floored, n, 16) == allocated_density(plain, n, 16)
    widest = assign_head_classes(floored)[0]
    held = widest.held_blocks(2000, 1000, 16) if elastic == "prompt" else None
    assert held in (None, cdiv(2000, 16))


@pytest.mark.parametrize("elastic", ["position", "prompt"])
@pytest.mark.parametrize("floor", [0, 512])
def test_peak_blocks_cover_every_prefill_step(elastic, floor):
    """The admission cap is never below what a request holds while its prompt is
    computed in chunks: blocks up to the chunk's end, less those dead before it (a
    position-elastic plan frees nothing while its queries sit under the floor)."""
    plan = uniform_plan(random_plan().model, 0.25, elastic=elastic, grow=True, granule=16,
                        exact_floor=floor)
    head_class = assign_head_classes(plan)[0]
    prompt, chunk, bs = 1000, 64, 16
    held = []
    for start in range(0, prompt, chunk):
        first, last = head_class.dead_blocks(start, prompt, bs)
        held.append(cdiv(min(prompt, start + chunk), bs) - max(0, last - first))
    assert max(held) <= head_class.peak_blocks(prompt, chunk, bs) <= cdiv(prompt, bs)
    if floor and elastic == "position":
        assert max(held) >= floor // bs


# -- hybrid models: slots on the full-attention layers only --------------------------

def hybrid_plan(density=0.5) -> Plan:
    fp = ModelFingerprint(
        architecture="Gemma3ForCausalLM", num_layers=18, num_attention_heads=4, num_kv_heads=1,
        head_dim=256, max_position_embeddings=32768, windowed_layers=[
            i for i in range(18) if i % 6 != 5], sliding_window=512)
    return uniform_plan(fp, density, grow=True, sink_tokens=64, granule=64)


def test_hybrid_head_classes_cover_the_full_layers_only():
    from moa_vllm.span_classes import head_class_assignment

    plan = hybrid_plan()
    assignment = head_class_assignment(plan)
    assert [bool(row) for row in assignment] == [i % 6 == 5 for i in range(18)]
    slots = sorted(s for c in assign_head_classes(plan) for s in c.kv_heads)
    assert slots == [(5, 0), (11, 0), (17, 0)]


def test_windowed_layers_hold_their_window_as_vllm_frees_it():
    from moa_vllm.span_classes import windowed_held_blocks

    assert windowed_held_blocks(512, 300, 16) == cdiv(300, 16)  # inside the window
    # vLLM's sliding-window manager frees blocks wholly before position t - W + 1
    for length in (513, 1000, 4096, 4100):
        first = (length - 512 + 1) // 16
        assert windowed_held_blocks(512, length, 16) == cdiv(length, 16) - first
        assert windowed_held_blocks(512, length, 16) <= 512 // 16 + 1


def test_model_density_counts_both_kinds_of_layers_against_the_models_own_cache():
    from moa_vllm.span_classes import model_density, windowed_held_blocks

    plan = hybrid_plan()
    for length in (4096, 16384, 32768):
        full = allocated_density(plan, length, 64)
        window = windowed_held_blocks(512, length, 64) / cdiv(length, 64)
        expected = (15 * window + 3 * full) / (15 * window + 3)
        assert model_density(plan, length, 64) == pytest.approx(expected)
        assert full < model_density(plan, length, 64) < 1  # the windows are already small
    plain = random_plan()
    assert model_density(plain, 4096, 16) == pytest.approx(allocated_density(plain, 4096, 16))
    assert average_density(plan, 16384) == pytest.approx(0.5, abs=0.01)  # the full layers'
