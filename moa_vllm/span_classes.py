"""Span classes: groups of layers that share one vLLM block table.

vLLM frees KV blocks per KV-cache group, and all layers of a group share one
block table, so a group can only free what is dead for *every* head of *every*
layer in it. Layers are therefore sorted by their widest rule and cut into a few
equal-sized classes (vLLM requires groups of equal layer counts); each class
becomes one KV-cache group whose manager frees with the class's widest window.

The same arithmetic serves the KV-cache manager (what to free) and the plan tool
(the allocated density the runtime will actually achieve).
"""

from __future__ import annotations

from dataclasses import dataclass

from moa_vllm.plan import Plan
from moa_vllm.span_mask import (
    ElasticMode,
    elastic_length,
    first_needed_position,
    quantize_beta,
    window_size,
)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SpanClass:
    """The layers of one KV-cache group and the distinct rules they hold."""

    index: int
    layers: tuple[int, ...]
    rules: tuple[tuple[int, int], ...]  # distinct (alpha, beta_q)
    sink_tokens: int
    min_window: int
    elastic: ElasticMode

    def window(self, n: int) -> int:
        """The widest window of the class at elastic length ``n``."""
        return max(window_size(a, b, n, self.min_window) for a, b in self.rules)

    def dead_blocks(
        self, processed_tokens: int, prompt_len: int, block_size: int
    ) -> tuple[int, int]:
        """Block range ``[first, last)`` no later query of the request reads.

        The next query is at position ``processed_tokens``; sink blocks stay.
        """
        t = processed_tokens
        w = self.window(elastic_length(t, prompt_len, self.elastic))
        first_needed = first_needed_position(t, w, self.sink_tokens)
        return cdiv(self.sink_tokens, block_size), first_needed // block_size

    def held_blocks(self, num_tokens: int, prompt_len: int, block_size: int) -> int:
        """Blocks a request of ``num_tokens`` tokens holds at steady decode."""
        first, last = self.dead_blocks(num_tokens, prompt_len, block_size)
        return cdiv(num_tokens, block_size) - max(0, last - first)


def num_span_classes(num_layers: int, max_classes: int) -> int:
    """Largest class count <= max_classes that splits the layers evenly."""
    return max(k for k in range(1, max_classes + 1) if num_layers % k == 0)


def assign_span_classes(plan: Plan, max_classes: int | None = None) -> list[SpanClass]:
    """Sort layers by their widest window at the model's context length and cut
    them into equal classes (optimal for the sum of class maxima at that length)."""
    max_classes = max_classes or plan.max_span_classes
    num_layers = plan.model.num_layers
    k = num_span_classes(num_layers, max_classes)
    n_ref = plan.model.max_position_embeddings
    layer_rules = [
        sorted({(a, quantize_beta(b)) for a, b in plan.rules[layer]})
        for layer in range(num_layers)
    ]

    def widest(layer: int) -> tuple[int, int]:
        return (
            max(window_size(a, b, n_ref, plan.min_window) for a, b in layer_rules[layer]),
            layer,
        )

    order = sorted(range(num_layers), key=widest)
    size = num_layers // k
    classes = []
    for c in range(k):
        layers = tuple(sorted(order[c * size : (c + 1) * size]))
        rules = tuple(sorted({r for layer in layers for r in layer_rules[layer]}))
        classes.append(
            SpanClass(c, layers, rules, plan.sink_tokens, plan.min_window, plan.elastic)
        )
    return classes


def class_of_layer(classes: list[SpanClass], layer: int) -> SpanClass:
    return next(c for c in classes if layer in c.layers)


def head_density(alpha: int, beta: float, length: int, sink_tokens: int, min_window: int,
                 elastic: ElasticMode) -> float:
    """Fraction of a ``length``-token KV cache that the next query of one head still
    reads (token granularity, what the kernels read)."""
    n = elastic_length(length, length, elastic)
    w = window_size(alpha, quantize_beta(beta), n, min_window)
    first = first_needed_position(length, w, sink_tokens)
    kept = min(sink_tokens, length) + max(0, length - first)
    return min(kept, length) / length


def average_density(plan: Plan, length: int) -> float:
    """Mean ``head_density`` over every KV head of the plan."""
    total = sum(head_density(alpha, beta, length, plan.sink_tokens, plan.min_window, plan.elastic)
                for row in plan.rules for alpha, beta in row)
    return total / (plan.model.num_layers * plan.model.num_kv_heads)


def allocated_density(
    plan: Plan, length: int, block_size: int, max_classes: int | None = None
) -> float:
    """Fraction of a dense cache's blocks the runtime holds for a ``length``-token
    request (the prompt is the whole length): what vLLM's block pool will show."""
    classes = assign_span_classes(plan, max_classes)
    dense = cdiv(length, block_size)
    held = [c.held_blocks(length, length, block_size) for c in classes]
    return sum(held) / (len(classes) * dense)
