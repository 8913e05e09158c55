"""Which KV-cache slots does the kernel read? Recorded exactly in the interpreter.

The NaN-poison test proves the V side by the output; here every masked load the
interpreter executes is recorded, so K loads and block-table-driven gathers are
checked too: the kernel reads only slots inside some query's span, and reads each
needed slot at most twice (K and V halves), i.e. no tile is visited twice.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _helpers import make_case, reference, run_kernel, span_needed


@pytest.fixture
def recorded_loads(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("load recording needs Triton's interpreter (CPU only)")
    from triton.runtime import interpreter

    loads: list[np.ndarray] = []
    original = interpreter.InterpreterBuilder.create_masked_load

    def recording(self, ptrs, mask, other, cache_policy, is_volatile):
        loads.append(np.asarray(ptrs.data)[np.asarray(mask.data, dtype=bool)].ravel().copy())
        return original(self, ptrs, mask, other, cache_policy, is_volatile)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", recording)
    return loads


def _slots_read(kv: torch.Tensor, loads: list[np.ndarray]) -> torch.Tensor:
    """Count of element reads per (block, head, slot) of the cache."""
    addrs = np.concatenate(loads).astype(np.int64) if loads else np.zeros(0, np.int64)
    base = kv.data_ptr()
    item = kv.element_size()
    nbytes = kv.untyped_storage().nbytes()
    inside = (addrs >= base) & (addrs < base + nbytes)
    elem = (addrs[inside] - base) // item
    s0, s1, s2, s3 = kv.stride()
    assert s3 == 1
    # decompose by strides, largest first
    order = sorted([(s0, 0), (s1, 1), (s2, 2)], reverse=True)
    idx = [None, None, None]
    rest = elem
    for stride, dim in order:
        idx[dim] = rest // stride
        rest = rest % stride
    counts = torch.zeros(kv.shape[:3], dtype=torch.int64)
    flat = (idx[0] * kv.shape[1] + idx[1]) * kv.shape[2] + idx[2]
    counts.view(-1).index_add_(0, torch.from_numpy(flat), torch.ones(len(flat), dtype=torch.int64))
    return counts


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_reads_only_span_slots(recorded_loads, splits, transposed):
    case = make_case(
        [333, 150, 70], [1, 41, 1], num_heads=4, num_kv_heads=2, head_size=32,
        rules=[(9, 0.125), (20, 0.0)], sink_tokens=5, transposed=transposed,
        seed=13, spare_blocks=5,
    )
    out = run_kernel(case, num_splits=splits)
    assert (out - reference(case)).abs().max() < 2e-4
    counts = _slots_read(case.kv_cache, recorded_loads)
    need = span_needed(case)
    head_size = case.query.shape[-1]
    assert counts.sum() > 0
    outside = counts[~need]
    assert outside.sum() == 0, f"{int((outside > 0).sum())} slots outside the spans were read"
    # each needed slot: K and V halves read once per program using it; the prefill
    # request's q-blocks overlap in windows, so allow re-reads across programs but
    # not more than one read per element per q-block program.
    assert (counts[need] > 0).all(), "a needed slot was never read"
    max_programs = 41  # upper bound: q-blocks of the prefill request
    assert counts.max() <= 2 * head_size * max_programs


def test_decode_reads_each_slot_once(recorded_loads):
    """Decode: every needed slot is read exactly once (K + V = 2 * head_size
    elements), so no tile is loaded twice and nothing else is loaded."""
    case = make_case([400, 90], [1, 1], num_heads=6, num_kv_heads=2, head_size=32,
                     rules=[(7, 0.25), (30, 0.0)], sink_tokens=3, transposed=True, seed=8)
    run_kernel(case, num_splits=4)
    counts = _slots_read(case.kv_cache, recorded_loads)
    need = span_needed(case)
    assert (counts[need] == 2 * 32).all()
    assert (counts[~need] == 0).all()
