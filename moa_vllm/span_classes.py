"""Head classes: the KV heads (layer, local KV head) that share one vLLM block table.

vLLM frees KV blocks per KV-cache group, and all "layers" of a group share one
block table. The engine gives every KV head its own one-head KV-cache layer, so a
group is a set of KV heads: a *head class*. A class can only free what is dead
for every KV head in it, so it holds the blocks of its widest rule. Classes have
equal sizes (vLLM splits and pads groups of unequal sizes).

The same arithmetic serves the KV-cache manager (what to free), the engine (which
KV head goes to which group), the plan tools and the planner (the allocated
density the runtime will actually achieve).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moa_vllm.plan import Plan
from moa_vllm.span_mask import SpanParams, quantize_beta, window_size

ASSIGNMENT_BLOCK_SIZE = 16  # block size the derived assignment is optimised for

KVHead = tuple[int, int]  # (layer, local KV head)
Rule = tuple[int, int]  # (alpha, beta_q)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class HeadClass:
    """The KV heads of one KV-cache group and the distinct rules they hold."""

    index: int
    kv_heads: tuple[KVHead, ...]
    rules: tuple[Rule, ...]
    params: SpanParams

    def window(self, n: int) -> int:
        """The widest window of the class at elastic length ``n``."""
        return max(self.params.window(a, b, n) for a, b in self.rules)

    def dead_blocks(
        self, processed_tokens: int, prompt_len: int, block_size: int
    ) -> tuple[int, int]:
        """Block range ``[first, last)`` no later query of the request reads.

        The next query is at position ``processed_tokens``; sink blocks stay.
        """
        t, p = processed_tokens, self.params
        first_needed = p.first_needed(t, self.window(p.elastic_length(t, prompt_len)))
        return cdiv(p.sink_tokens, block_size), first_needed // block_size

    def held_blocks(self, num_tokens: int, prompt_len: int, block_size: int) -> int:
        """Blocks a request of ``num_tokens`` tokens holds at steady decode."""
        first, last = self.dead_blocks(num_tokens, prompt_len, block_size)
        return cdiv(num_tokens, block_size) - max(0, last - first)

    def peak_blocks(self, prompt_len: int, in_flight_tokens: int, block_size: int) -> int:
        """Most blocks a request with this prompt holds while its prompt is computed
        (sinks + the widest window at the prompt's length, rounded down to the
        granule, or in position mode the exact floor if that is more, + the
        in-flight chunk): its admission cap, as vLLM's sliding-window manager has
        one."""
        p = self.params
        window = self.window(prompt_len)  # windows never shrink as N grows
        held = window - 1 + p.granule - 1
        if p.elastic == "position":  # queries up to the floor read (and keep) all keys
            held = max(held, min(p.exact_floor, prompt_len))
        tokens = min(prompt_len, held + in_flight_tokens)
        return min(cdiv(prompt_len, block_size),
                   cdiv(p.sink_tokens, block_size) + cdiv(tokens, block_size) + 1)


def concurrency(classes: tuple[HeadClass, ...], length: int, in_flight_tokens: int,
                block_size: int, pool_blocks: int) -> float:
    """Requests of ``length`` tokens a pool of ``pool_blocks`` runs at once under
    vLLM's admission: a request is admitted when its prefill peak is free, and
    holds its spans once its prompt is in; so one peak and the rest at their spans.
    Below 1 when even one request's peak does not fit."""
    peak = sum(c.peak_blocks(length, in_flight_tokens, block_size) for c in classes)
    if pool_blocks < peak:
        return pool_blocks / peak
    held = sum(c.held_blocks(length, length, block_size) for c in classes)
    return 1 + (pool_blocks - peak) / held


def num_head_classes(num_items: int, max_classes: int) -> int:
    """Largest class count <= max_classes that splits the items evenly."""
    return max(k for k in range(1, max_classes + 1) if num_items % k == 0)


def local_kv_heads(num_kv_heads: int, tp_size: int) -> int:
    """KV heads per tensor-parallel rank (vLLM replicates them when TP > heads)."""
    return max(1, num_kv_heads // tp_size)


def rank_kv_heads(num_kv_heads: int, tp_size: int, rank: int) -> range:
    """The plan's KV heads tensor-parallel rank ``rank`` holds."""
    local = local_kv_heads(num_kv_heads, tp_size)
    start = rank * local if num_kv_heads >= tp_size else rank * num_kv_heads // tp_size
    return range(start, start + local)


def kv_head_rules(plan: Plan, tp_size: int = 1) -> dict[KVHead, tuple[Rule, ...]]:
    """Each (layer, local KV head)'s rules: those of the plan's heads that sit there
    on some rank (every rank must report the same spec for it)."""
    heads = plan.model.num_kv_heads
    out = {}
    for layer, row in plan.layer_rules():
        for j in range(local_kv_heads(heads, tp_size)):
            rules = {(row[g][0], quantize_beta(row[g][1]))
                     for g in (rank_kv_heads(heads, tp_size, r)[j] for r in range(tp_size))}
            out[(layer, j)] = tuple(sorted(rules))
    return out


def objective_lengths(context: int) -> list[int]:
    """Lengths the derived assignment is optimised at: 512 up to the context, at
    powers of two and halfway between (and the context itself)."""
    lengths = {context}
    n = 512
    while n < context:
        lengths |= {n, min(context, n * 3 // 2)}
        n *= 2
    return sorted(lengths)


class _Objective:
    """Held blocks of every KV head alone at the objective lengths: a class holds the
    maximum over its KV heads (held blocks grow with the window)."""

    def __init__(self, plan: Plan, rules: dict[KVHead, tuple[Rule, ...]],
                 kv_heads: list[KVHead]):
        lengths = objective_lengths(plan.model.max_position_embeddings)
        bs, params = ASSIGNMENT_BLOCK_SIZE, plan.span_params
        self.held = np.array([
            [HeadClass(0, (s,), rules[s], params).held_blocks(n, n, bs)
             for n in lengths]
            for s in kv_heads], dtype=np.float64)  # [KV heads, lengths]
        self.weight = 1.0 / np.array([cdiv(n, bs) for n in lengths], dtype=np.float64)

    def totals(self, classes: list[list[int]]) -> np.ndarray:
        """Held blocks of all classes, per objective length."""
        return sum(self.held[c].max(axis=0) for c in classes)

    def cost(self, classes: list[list[int]]) -> float:
        return float(self.totals(classes) @ self.weight)


def _improve(obj: _Objective, classes: list[list[int]], ceiling: np.ndarray | None,
             max_passes: int = 20) -> list[list[int]]:
    """Swap KV heads between classes while the weighted held blocks fall, never
    above ``ceiling`` at any length."""
    classes = [list(c) for c in classes]
    held, w = obj.held, obj.weight
    for _ in range(max_passes):
        improved = False
        for a in range(len(classes)):
            for b in range(a + 1, len(classes)):
                ca, cb = np.array(classes[a]), np.array(classes[b])
                ma, mb = held[ca].max(axis=0), held[cb].max(axis=0)
                # the class maximum without each member: the top-2 trick
                wa = _max_without(held[ca])  # [size, lengths]
                wb = _max_without(held[cb])
                new_a = np.maximum(wa[:, None, :], held[cb][None, :, :])  # [i, j, lengths]
                new_b = np.maximum(wb[None, :, :], held[ca][:, None, :])
                delta_t = new_a + new_b - (ma + mb)  # [i, j, lengths]
                delta = delta_t @ w
                if ceiling is not None:
                    base = obj.totals(classes)
                    delta = np.where((base + delta_t <= ceiling + 1e-9).all(axis=2), delta, 0.0)
                i, j = np.unravel_index(int(np.argmin(delta)), delta.shape)
                if delta[i, j] < -1e-12:
                    classes[a][i], classes[b][j] = classes[b][j], classes[a][i]
                    improved = True
        if not improved:
            break
    return [sorted(c) for c in classes]


def _max_without(rows: np.ndarray) -> np.ndarray:
    """``out[i] = rows[others than i].max(axis=0)`` (``-inf``-free: one row gives 0)."""
    if len(rows) == 1:
        return np.zeros_like(rows)
    order = np.argsort(-rows, axis=0)
    top1 = np.take_along_axis(rows, order[:1], axis=0)[0]
    top2 = np.take_along_axis(rows, order[1:2], axis=0)[0]
    is_top = np.arange(len(rows))[:, None] == order[0][None, :]
    return np.where(is_top, top2, top1)


def head_class_assignment(plan: Plan, tp_size: int = 1,
                          max_classes: int | None = None) -> list[list[int]]:
    """Class of every (layer, local KV head), ``[layer][local head]``.

    The plan's own assignment when it carries one (TP = 1); else derived: equal
    classes, KV heads sorted by their widest window at the context length, then
    improved by swaps (weighted held blocks over ``objective_lengths``). The
    ``gcd(k, layers)`` layer classes (layers sorted by their widest window, as the
    layer-class runtime cut them), each cut into equal head classes, are a second
    start and a ceiling its swaps never exceed at any objective length; the
    sorted start's result is kept only if it stays under that ceiling too. So a
    plan searched for those layer classes never holds more under head classes.
    """
    if plan.head_classes is not None and tp_size == 1:
        return [list(row or ()) for row in plan.head_classes]
    rules = kv_head_rules(plan, tp_size)
    kv_heads = sorted(rules)
    max_classes = max_classes or plan.max_head_classes
    k = num_head_classes(len(kv_heads), max_classes)
    size = len(kv_heads) // k
    n_ref = plan.model.max_position_embeddings
    obj = _Objective(plan, rules, kv_heads)

    def widest(i: int) -> tuple[int, KVHead]:
        s = kv_heads[i]
        return max(window_size(a, b, n_ref, plan.min_window) for a, b in rules[s]), s

    order = sorted(range(len(kv_heads)), key=widest)
    candidates = [_improve(obj, [order[c * size:(c + 1) * size] for c in range(k)], None)]
    full_layers = plan.model.full_layers
    layers = len(full_layers)
    k_layer = math.gcd(k, layers)
    if k_layer > 1:  # layer classes, each cut into k / k_layer head classes
        layer_order = sorted(full_layers, key=lambda l: max(
            widest(i) for i in range(len(kv_heads)) if kv_heads[i][0] == l))
        refined = []
        for c in range(k_layer):
            members = set(layer_order[c * layers // k_layer:(c + 1) * layers // k_layer])
            part = sorted((i for i in range(len(kv_heads)) if kv_heads[i][0] in members),
                          key=widest)
            refined += [part[p * size:(p + 1) * size] for p in range(len(part) // size)]
        candidates.append(_improve(obj, refined, obj.totals(refined)))
        if not (obj.totals(candidates[0]) <= obj.totals(refined) + 1e-9).all():
            candidates.pop(0)  # it holds more than the layer classes somewhere
    best = min(candidates, key=obj.cost)
    local = local_kv_heads(plan.model.num_kv_heads, tp_size)
    windowed = set(plan.model.windowed_layers)  # no KV heads: rows stay empty
    assignment = [[] if layer in windowed else [0] * local
                  for layer in range(plan.model.num_layers)]
    for c, members in enumerate(sorted(best, key=lambda m: min(kv_heads[i] for i in m))):
        for i in members:
            layer, j = kv_heads[i]
            assignment[layer][j] = c
    return assignment


def single_rule_classes(rules: list[list[tuple[int, float]]], num_classes: int,
                        max_position: int, min_window: int) -> list[list[int]]:
    """The assignment of a plan whose classes hold one rule each (what the search
    makes): the KV heads of each rule cut into classes of ``KV heads / num_classes``,
    numbered by window at ``max_position``. Each rule's KV-head count must be a
    multiple of the class size."""
    kv_heads = [(layer, h) for layer, row in enumerate(rules) if row is not None
             for h in range(len(row))]
    size, rest = divmod(len(kv_heads), num_classes)
    by_rule: dict[Rule, list[KVHead]] = {}
    for layer, h in kv_heads:
        alpha, beta = rules[layer][h]
        by_rule.setdefault((alpha, quantize_beta(beta)), []).append((layer, h))
    bad = {r: len(m) for r, m in by_rule.items() if len(m) % max(1, size)}
    if rest or bad:
        raise ValueError(f"{num_classes} single-rule classes need each rule on a multiple of "
                         f"{size} kv_heads of {len(kv_heads)}; got rule counts {bad}")
    assignment = [None if row is None else [0] * len(row) for row in rules]
    order = sorted(by_rule, key=lambda r: (window_size(*r, max_position, min_window), r))
    c = 0
    for rule in order:
        members = by_rule[rule]
        for start in range(0, len(members), size):
            for layer, h in members[start:start + size]:
                assignment[layer][h] = c
            c += 1
    return assignment


def head_classes(plan: Plan, assignment: list[list[int]], tp_size: int = 1
                 ) -> tuple[HeadClass, ...]:
    """The classes of an assignment (``head_class_assignment``)."""
    rules = kv_head_rules(plan, tp_size)
    members: dict[int, list[KVHead]] = {}
    for layer, row in enumerate(assignment):
        for j, c in enumerate(row):
            members.setdefault(c, []).append((layer, j))
    return tuple(
        HeadClass(c, tuple(members[c]), tuple(sorted({r for s in members[c] for r in rules[s]})),
                  plan.span_params)
        for c in sorted(members))


def assign_head_classes(plan: Plan, tp_size: int = 1,
                        max_classes: int | None = None) -> tuple[HeadClass, ...]:
    return head_classes(plan, head_class_assignment(plan, tp_size, max_classes), tp_size)


def head_density(alpha: int, beta: float, length: int, params: SpanParams) -> float:
    """Fraction of a ``length``-token KV cache that the next query of one head still
    reads (token granularity, what the kernels read)."""
    w = params.window(alpha, quantize_beta(beta), params.elastic_length(length, length))
    first = params.first_needed(length, w)
    kept = min(params.sink_tokens, length) + max(0, length - first)
    return min(kept, length) / length


def average_density(plan: Plan, length: int) -> float:
    """Mean ``head_density`` over every KV head MoA serves (full-attention layers)."""
    rows, params = [row for _, row in plan.layer_rules()], plan.span_params
    total = sum(head_density(alpha, beta, length, params) for row in rows for alpha, beta in row)
    return total / (len(rows) * plan.model.num_kv_heads)


def allocated_density(plan: Plan, length: int, block_size: int,
                      classes: tuple[HeadClass, ...] | None = None) -> float:
    """Fraction of a dense cache's blocks the runtime holds for a ``length``-token
    request (the prompt is the whole length): what vLLM's block pool will show."""
    classes = classes or assign_head_classes(plan)
    dense = cdiv(length, block_size)
    held = sum(c.held_blocks(length, length, block_size) * len(c.kv_heads) for c in classes)
    return held / (sum(len(c.kv_heads) for c in classes) * dense)


def windowed_held_blocks(window: int, length: int, block_size: int) -> int:
    """Blocks vLLM's sliding-window manager holds for a ``length``-token request
    at steady decode: the blocks of the last ``window - 1`` tokens and the next one."""
    if length <= window:
        return cdiv(length, block_size)
    first = (length - window + 1) // block_size
    return cdiv(length, block_size) - first


def model_density(plan: Plan, length: int, block_size: int,
                  classes: tuple[HeadClass, ...] | None = None) -> float:
    """Fraction of the model's own cache (its windowed layers windowed by vLLM,
    the others dense) that the whole cache under MoA holds at ``length``: the
    same as ``allocated_density`` for a model without windowed layers."""
    fp = plan.model
    full = allocated_density(plan, length, block_size, classes) * len(fp.full_layers)
    if not fp.windowed_layers:
        return full / len(fp.full_layers)
    dense = cdiv(length, block_size)
    windowed = (windowed_held_blocks(fp.sliding_window, length, block_size) / dense
                * len(fp.windowed_layers))
    model = windowed + len(fp.full_layers)
    return (windowed + full) / model
