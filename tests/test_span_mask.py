import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moa_vllm.span_mask import (
    BETA_SCALE,
    FULL_WINDOW,
    LayerSpans,
    SpanParams,
    first_needed_position,
    masked_attention,
    quantize_beta,
    window_size,
)


def spans(alphas, betas, sink=4, min_window=2, elastic="position", granule=1, exact_floor=0):
    return LayerSpans(
        torch.tensor(alphas, dtype=torch.int32),
        torch.tensor([quantize_beta(b) for b in betas], dtype=torch.int32),
        SpanParams(sink, min_window, elastic, granule, exact_floor),
    )


def test_window_is_integer_exact_at_boundaries():
    # beta=0.1 is not a float multiple: fp64 gives ceil(0.1*10)=ceil(1.0000000000000002)=2.
    beta_q = quantize_beta(0.25)
    assert window_size(0, beta_q, 8, 1) == 2  # exactly 0.25 * 8
    assert window_size(0, beta_q, 9, 1) == 3  # ceil(2.25)
    assert window_size(-100, beta_q, 8, 5) == 5  # min_window floors negative alphas
    assert BETA_SCALE * 0.25 == beta_q


def test_mask_matches_definition():
    s = spans([3, 0], [0.0, 0.5], sink=2, min_window=1)
    q_pos = torch.arange(10, 20)
    k_pos = torch.arange(20)
    n = q_pos + 1
    mask = s.mask(q_pos, k_pos, n)
    for h, (alpha, beta) in enumerate([(3, 0.0), (0, 0.5)]):
        for i, t in enumerate(q_pos.tolist()):
            w = max(1, alpha + math.ceil(beta * (t + 1)))
            for j in range(20):
                expected = j <= t and (j < 2 or t - j < w)
                assert bool(mask[h, i, j]) == expected, (h, t, j)


@pytest.mark.parametrize("granule", [1, 16, 64])
@pytest.mark.parametrize("elastic", ["position", "prompt"])
@pytest.mark.parametrize("sink_granules", [0, 1])
def test_granule_mask_matches_definition(granule, elastic, sink_granules):
    """Window starts rounded down to the granule, from the written-out definition;
    windows smaller than the granule, sinks 0 and = granule, a chunk of queries."""
    sink = sink_granules * granule
    rules = [(3, 0.0), (0, 0.5), (100, 0.25), (-40, 1.0)]  # 3 < granule: narrower
    s = spans([a for a, _ in rules], [b for _, b in rules], sink=sink, min_window=1,
              elastic=elastic, granule=granule)
    prompt_len = 150
    q_pos = torch.arange(120, 200)  # a chunk of prefill past the prompt start
    k_pos = torch.arange(200)
    n = q_pos + 1 if elastic == "position" else torch.full_like(q_pos, prompt_len)
    mask = s.mask(q_pos, k_pos, n)
    for h, (alpha, beta) in enumerate(rules):
        for i, t in enumerate(q_pos.tolist()):
            big_n = t + 1 if elastic == "position" else prompt_len
            w = max(1, alpha + math.ceil(beta * big_n))
            start = math.floor((t - w + 1) / granule) * granule
            for j in range(200):
                expected = j <= t and (j < sink or j >= start)
                assert bool(mask[h, i, j]) == expected, (h, t, j)
                if granule > 1 and j <= t and t - j < w:
                    assert mask[h, i, j]  # never less than the token-exact rule
    if granule > 1:  # and it does widen some windows
        exact = spans([a for a, _ in rules], [b for _, b in rules], sink=sink, min_window=1,
                      elastic=elastic).mask(q_pos, k_pos, n)
        assert (mask & ~exact).any() and not (exact & ~mask).any()


@settings(max_examples=200, deadline=None)
@given(
    alpha=st.integers(-64, 256),
    beta=st.floats(0.0, 1.0),
    sink=st.integers(0, 64),
    min_window=st.integers(1, 64),
    t=st.integers(0, 5000),
    granule=st.sampled_from([1, 16, 64]),
)
def test_window_start_never_moves_back_in_position_mode(alpha, beta, sink, min_window, t,
                                                         granule):
    """The property KV freeing relies on: what is dead stays dead."""
    bq = quantize_beta(beta)
    now = first_needed_position(t, window_size(alpha, bq, t + 1, min_window), sink, granule)
    nxt = first_needed_position(t + 1, window_size(alpha, bq, t + 2, min_window), sink,
                                granule)
    assert nxt >= now


@pytest.mark.parametrize("granule", [1, 16])
def test_key_positions_cover_every_allowed_key(granule):
    s = spans([5, 20], [0.0, 0.25], sink=0 if granule > 1 else 3, min_window=2,
              granule=granule)
    seq_len, q_len = 200, 30
    q_pos = torch.arange(seq_len - q_len, seq_len)
    k_pos = s.key_positions(int(q_pos[0]), int(q_pos[0]) + 1, seq_len)
    allowed = s.mask(q_pos, torch.arange(seq_len), q_pos + 1).any(dim=(0, 1))
    needed = set(torch.nonzero(allowed).flatten().tolist())
    assert needed <= set(k_pos.tolist())
    assert len(k_pos) < seq_len  # and it does skip what no head reads


@pytest.mark.parametrize("elastic", ["position", "prompt"])
def test_exact_floor_reads_every_key_up_to_it_and_the_rules_beyond(elastic):
    """While N <= exact_floor every query reads every earlier key (decode tokens of
    a short prompt too, in prompt mode); beyond it the rules apply unchanged."""
    floored = spans([3, 0], [0.0, 0.25], sink=2, elastic=elastic, granule=4, exact_floor=40)
    plain = spans([3, 0], [0.0, 0.25], sink=2, elastic=elastic, granule=4)
    q_pos, k_pos = torch.arange(90), torch.arange(90)
    causal = (k_pos[None, :] <= q_pos[:, None])[None].expand(2, -1, -1)
    for prompt_len in (30, 40, 41, 80):
        n = q_pos + 1 if elastic == "position" else torch.full_like(q_pos, prompt_len)
        exact = n <= 40
        got, rules = floored.mask(q_pos, k_pos, n), plain.mask(q_pos, k_pos, n)
        assert torch.equal(got[:, exact], causal[:, exact])
        assert torch.equal(got[:, ~exact], rules[:, ~exact])
        if exact.any():  # the floor did something
            assert not torch.equal(rules[:, exact], causal[:, exact])
    assert window_size(3, 0, 40, 2, exact_floor=40) == FULL_WINDOW
    assert window_size(3, 0, 41, 2, exact_floor=40) == 3


def test_masked_attention_is_softmax_over_the_allowed_keys():
    """The one masked attention (oracle, torch path, planner) against the formula."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(s, h, 16, generator=g) for s, h in ((5, 6), (9, 2), (9, 2)))
    allowed = torch.rand(2, 5, 9, generator=g) < 0.6
    allowed[:, :, 0] = True  # every query reads some key
    scores = torch.einsum("tkgd,skd->kgts", q.view(5, 2, 3, 16), k) * 0.3
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    expected = torch.einsum("kgts,skd->tkgd", probs, v).reshape(5, 6, 16)
    assert torch.allclose(masked_attention(q, k, v, allowed, 0.3), expected, atol=1e-6)
