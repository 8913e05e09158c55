"""Property test: random small batches, plans and layouts against the oracle."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _helpers import TOL, make_case, reference, run_kernel


@st.composite
def cases(draw):
    num_kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3, 8]))
    block_size = draw(st.sampled_from([8, 16, 32]))
    num_reqs = draw(st.integers(1, 3))
    seq_lens, query_lens = [], []
    for _ in range(num_reqs):
        seq_len = draw(st.integers(1, 160))
        q_len = draw(st.sampled_from([1, 1, seq_len, draw(st.integers(1, seq_len))]))
        seq_lens.append(seq_len)
        query_lens.append(q_len)
    rules = [
        (draw(st.integers(0, 64)), draw(st.sampled_from([0.0, 0.0625, 0.25, 0.5, 1.0])))
        for _ in range(num_kv_heads)
    ]
    elastic = draw(st.sampled_from(["position", "prompt"]))
    prompt_lens = [draw(st.integers(1, 200)) for _ in range(num_reqs)]
    return dict(
        seq_lens=seq_lens, query_lens=query_lens, num_heads=num_kv_heads * group,
        num_kv_heads=num_kv_heads, head_size=draw(st.sampled_from([32, 48, 64])),
        block_size=block_size, rules=rules, sink_tokens=draw(st.integers(0, 40)),
        min_window=draw(st.integers(1, 16)), elastic=elastic, prompt_lens=prompt_lens,
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
        transposed=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    ), draw(st.sampled_from([None, 1, 2, 5]))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(cases())
def test_random_plans_match_oracle(device, drawn):
    kwargs, splits = drawn
    case = make_case(device=device, **kwargs)
    out = run_kernel(case, num_splits=splits).cpu().float()
    ref = reference(case)
    assert not torch.isnan(out).any()
    err = (out - ref).abs().max().item()
    assert err <= TOL[case.query.dtype], err
