"""The exact MoA mask: the one definition used by the oracle, the kernels, the
planner and the KV-cache manager; and ``masked_attention``, the one attention under
it in torch (the oracle, the engine's torch path, the planner's masked forward).

A query at absolute position ``t`` attends to key ``j`` iff ``j <= t`` and
(``j < sink_tokens`` or ``j >= start``) with
``W = max(min_window, alpha + ceil(beta * N))`` and the window start
``start = floor((t - W + 1) / g) * g``: rounded *down* to the plan's granule ``g``,
so a head never sees less than its rule gives. ``g = 1`` is token-exact
(``t - j < W``); with ``g`` a multiple of the KV block size (and ``sink_tokens`` a
multiple of ``g``) a decode query reads whole blocks only, which a stock dense
attention op can serve over a compacted block table.

``alpha`` is an integer number of tokens and ``beta`` is applied in fixed point
(``beta_q = round(beta * BETA_SCALE)``), so every implementation (torch, Triton,
the scheduler's integer arithmetic) computes the very same ``W``: a float
``ceil(alpha + beta * N)`` would differ between fp32, fp64 and fused multiply-add
exactly at the boundaries.

``N`` is the elastic length: the request's prompt length (``elastic="prompt"``)
or ``t + 1`` (``elastic="position"``). While ``N <= exact_floor`` every head reads
every key (``W = FULL_WINDOW``): short prompts hold little KV, so a plan keeps them
exact and spends its density where memory matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

BETA_SCALE = 4096
"""Resolution of ``beta``: ``beta`` is applied as ``beta_q / BETA_SCALE``."""

ElasticMode = Literal["prompt", "position"]


FULL_WINDOW = 1 << 30
"""The window of an exact (``N <= exact_floor``) query: longer than any request."""


def quantize_beta(beta: float) -> int:
    return int(round(beta * BETA_SCALE))


def beta_growth(beta_q, n):
    """``ceil(beta_q * n / BETA_SCALE)`` in integers; works on ints, numpy and torch."""
    return -((-beta_q * n) // BETA_SCALE)


def window_size(alpha: int, beta_q: int, n: int, min_window: int, exact_floor: int = 0) -> int:
    """W for one rule at elastic length ``n`` (python ints: scheduler, planner)."""
    if n <= exact_floor:
        return FULL_WINDOW
    return max(min_window, alpha + beta_growth(beta_q, n))


def elastic_length(position: int, prompt_len: int, elastic: ElasticMode) -> int:
    return position + 1 if elastic == "position" else prompt_len


def elastic_lengths(
    spans: "LayerSpans", q_pos: torch.Tensor, prompt_len: int | None
) -> torch.Tensor:
    """N for each query position of one request (the tensor form of ``elastic_length``)."""
    if spans.params.elastic == "position":
        return q_pos + 1
    assert prompt_len is not None, "elastic='prompt' needs the prompt length"
    return torch.full_like(q_pos, prompt_len)


def window_start(position, window, granule: int = 1):
    """First key of the window (may be negative: the window reaches the start);
    works on ints, numpy and torch."""
    return (position - window + 1) // granule * granule


def first_needed_position(
    position: int, window: int, sink_tokens: int, granule: int = 1
) -> int:
    """First non-sink key a query at ``position`` still reads.

    Window starts never move backwards for ``0 <= beta <= 1``, so every key below
    this (and above the sinks) is dead for all later queries of the request.
    """
    return max(sink_tokens, window_start(position, window, granule))


@dataclass(frozen=True)
class SpanParams:
    """What every head's span shares besides its rule (a plan's, a head class's, a
    layer's): the sinks, the smallest window, the elastic mode, the granule and the
    exact floor."""

    sink_tokens: int
    min_window: int
    elastic: ElasticMode
    granule: int = 1
    exact_floor: int = 0

    def window(self, alpha: int, beta_q: int, n: int) -> int:
        """``window_size`` of one rule under these parameters."""
        return window_size(alpha, beta_q, n, self.min_window, self.exact_floor)

    def elastic_length(self, position: int, prompt_len: int) -> int:
        return elastic_length(position, prompt_len, self.elastic)

    def first_needed(self, position: int, window: int) -> int:
        """``first_needed_position`` under these sinks and granule."""
        return first_needed_position(position, window, self.sink_tokens, self.granule)


@dataclass(frozen=True)
class LayerSpans:
    """The rules of one attention layer, one per KV head (tensors on any device)."""

    alpha: torch.Tensor  # [num_kv_heads] int32
    beta_q: torch.Tensor  # [num_kv_heads] int32
    params: SpanParams

    @classmethod
    def model_window(cls, window: int, num_kv_heads: int) -> LayerSpans:
        """A layer the model windows itself (vLLM's sliding window and HF's): each
        query reads its last ``window`` keys, itself included, and no sinks."""
        alpha = torch.full((num_kv_heads,), window, dtype=torch.int32)
        return cls(alpha, torch.zeros_like(alpha), SpanParams(0, 1, "position"))

    def to(self, device: torch.device | str) -> LayerSpans:
        return LayerSpans(self.alpha.to(device), self.beta_q.to(device), self.params)

    def windows(self, n: torch.Tensor) -> torch.Tensor:
        """W per (KV head, query): ``n`` is ``[Tq]`` elastic lengths -> ``[Hkv, Tq]``."""
        n = n.to(torch.int64)[None, :]
        beta_q = self.beta_q.to(torch.int64)[:, None]
        alpha = self.alpha.to(torch.int64)[:, None]
        w = torch.clamp(alpha + beta_growth(beta_q, n), min=self.params.min_window)
        return torch.where(n <= self.params.exact_floor, FULL_WINDOW, w)

    def mask(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, n: torch.Tensor
    ) -> torch.Tensor:
        """Boolean ``[Hkv, Tq, Tk]``: may query ``q_pos[i]`` read key ``k_pos[j]``."""
        w = self.windows(n)[:, :, None]
        t = q_pos.to(torch.int64)[None, :, None]
        j = k_pos.to(torch.int64)[None, None, :]
        p = self.params
        return (j <= t) & ((j < p.sink_tokens) | (j >= window_start(t, w, p.granule)))

    def first_keys(self, q_pos: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """``[Hkv, Tq]`` int64: each query reads the sinks and every key from this on
        (``first_needed_position`` of each head, in tensors)."""
        start = window_start(q_pos.to(torch.int64)[None, :], self.windows(n), self.params.granule)
        return torch.clamp(start, min=self.params.sink_tokens)

    def key_positions(self, first_query: int, first_n: int, seq_len: int) -> torch.Tensor:
        """Keys a chunk of queries starting at ``first_query`` may read: the sinks and
        everything from the widest head's window start on. Window starts never
        move backwards, so later queries of the chunk need nothing earlier."""
        widest = int(self.windows(torch.tensor([first_n])).max())
        start = self.params.first_needed(first_query, widest)
        sinks = torch.arange(min(self.params.sink_tokens, seq_len))
        return torch.cat([sinks, torch.arange(min(start, seq_len), seq_len)])


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q ``[Tq, H, D]``, k/v ``[Tk, Hkv, D]``, allowed ``[Hkv, Tq, Tk]`` -> ``[Tq, H, D]``,
    in the inputs' dtype. PyTorch's fused attention with the mask (3-4x einsums on
    CPU); a query that may read no key gets NaN."""
    tq, num_heads, head_size = q.shape
    hkv = k.shape[1]
    group = num_heads // hkv
    qh = q.reshape(tq, hkv, group, head_size).permute(1, 2, 0, 3)
    kh = k.permute(1, 0, 2)[:, None].expand(-1, group, -1, -1)
    vh = v.permute(1, 0, 2)[:, None].expand(-1, group, -1, -1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed[:, None], scale=scale)
    return out.permute(2, 0, 1, 3).reshape(tq, num_heads, head_size)
