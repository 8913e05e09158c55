"""The Triton MoA kernel against the torch oracle (interpreter on CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _helpers import assert_matches, make_case, reference, run_kernel, span_needed

from moa_kernels import choose_num_splits

HEAD = 32


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("elastic", ["position", "prompt"])
def test_decode_gqa(device, group, elastic):
    hkv = 2
    case = make_case(
        [150, 67, 300], [1, 1, 1], num_heads=hkv * group, num_kv_heads=hkv, head_size=HEAD,
        rules=[(8, 0.25), (40, 0.0)], sink_tokens=4, elastic=elastic,
        prompt_lens=[120, 60, 200] if elastic == "prompt" else None,
        transposed=group == 3, device=device, seed=group,
    )
    assert_matches(case, num_splits=1)


@pytest.mark.parametrize("splits", [2, 4])
def test_split_decode(device, splits):
    case = make_case(
        [400, 33, 257], [1, 1, 1], num_heads=8, num_kv_heads=2, head_size=64,
        rules=[(64, 0.125), (16, 0.5)], sink_tokens=8, transposed=True, device=device, seed=7,
    )
    single = assert_matches(case, num_splits=1)
    split = assert_matches(case, num_splits=splits)
    assert torch.allclose(single, split, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(device, dtype):
    if dtype == torch.bfloat16 and device != "cuda":
        pytest.skip("bf16 only on GPU: the interpreter's bf16 path is what triton#11584 breaks")
    case = make_case([200, 90], [1, 13], num_heads=4, num_kv_heads=2, head_size=64,
                     rules=[(24, 0.25), (8, 0.0)], dtype=dtype, device=device, seed=3)
    assert_matches(case)
    assert_matches(case, num_splits=2)


@pytest.mark.parametrize("elastic", ["position", "prompt"])
def test_prefill_chunk_at_offset(device, elastic):
    # 70 new tokens starting at position 130 (chunked prefill), windows grow inside the chunk
    case = make_case(
        [200], [70], num_heads=6, num_kv_heads=2, head_size=HEAD,
        rules=[(10, 0.25), (3, 0.0)], sink_tokens=5, elastic=elastic,
        prompt_lens=[230] if elastic == "prompt" else None, device=device, seed=11,
    )
    assert_matches(case)


def test_full_prefill_and_split_prefill(device):
    case = make_case([96], [96], num_heads=2, num_kv_heads=1, head_size=HEAD,
                     rules=[(12, 0.125)], sink_tokens=2, device=device, seed=5)
    assert_matches(case)
    assert_matches(case, num_splits=3)


def test_window_smaller_than_block_and_sink_larger_than_window(device):
    case = make_case(
        [130, 77], [1, 20], num_heads=4, num_kv_heads=2, head_size=HEAD, block_size=32,
        rules=[(3, 0.0), (0, 0.0)], sink_tokens=40, min_window=2, device=device, seed=2,
    )
    assert_matches(case)


def test_spans_beyond_sequence(device):
    # windows far larger than any sequence: dense causal attention
    case = make_case([50, 120], [1, 9], num_heads=4, num_kv_heads=2, head_size=HEAD,
                     rules=[(1000, 1.0), (0, 1.0)], sink_tokens=300, device=device, seed=4)
    out = assert_matches(case)
    # equal to a plain causal reference (no span at all)
    from moa_vllm.span_mask import LayerSpans, SpanParams

    dense = LayerSpans(case.spans.alpha * 0 + 10**6, case.spans.beta_q * 0,
                       SpanParams(0, 1, "position"))
    case.spans = dense.to(case.query.device)
    assert torch.allclose(out, reference(case), atol=2e-4)


def test_mixed_batch(device):
    # decode, prefill from 0, chunk at an offset, a 1-token request, an empty request
    case = make_case(
        [300, 40, 180, 1, 64], [1, 40, 33, 1, 0], num_heads=8, num_kv_heads=2,
        head_size=64, block_size=16, rules=[(16, 0.25), (5, 0.0)], sink_tokens=6,
        transposed=True, device=device, seed=9,
    )
    out = run_kernel(case)
    ref = reference(case)
    assert (out.cpu().float() - ref).abs().max() < 2e-4


def test_cut_spans_differ_from_dense(device):
    """Sanity: the test cases do cut something (a kernel ignoring spans fails)."""
    case = make_case([300], [1], num_heads=2, num_kv_heads=1, head_size=HEAD,
                     rules=[(8, 0.0)], sink_tokens=2, device=device)
    out = run_kernel(case).cpu().float()
    wide = dataclasses.replace(case.spans, alpha=case.spans.alpha + 1000)
    case.spans = wide
    assert (out - reference(case)).abs().max() > 1e-2


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("elastic", ["position", "prompt"])
def test_poisoned_outside_spans(device, splits, elastic):
    """NaN in every cache slot no query's span reads: the output stays finite, so
    skipped tiles and masked positions are never loaded."""
    case = make_case(
        [260, 120, 99], [1, 30, 1], num_heads=6, num_kv_heads=2, head_size=HEAD,
        rules=[(10, 0.125), (4, 0.0)], sink_tokens=3, elastic=elastic,
        prompt_lens=[200, 150, 99] if elastic == "prompt" else None,
        transposed=True, device=device, seed=21, spare_blocks=4,
    )
    ref = reference(case)
    need = span_needed(case).to(case.kv_cache.device)
    poisoned = case.kv_cache.clone()
    poisoned[~need] = float("nan")
    # the poison does hit slots inside sequences (not only spare blocks)
    assert (~need).sum() > 100
    case.kv_cache = poisoned
    out = run_kernel(case, num_splits=splits).cpu().float()
    assert not torch.isnan(out).any()
    assert (out - ref).abs().max() < 2e-4


@pytest.mark.parametrize("elastic", ["position", "prompt"])
def test_decode_replays_the_launch_of_a_capture(device, elastic):
    # A full CUDA graph replays the host integers of its capture (grid, split
    # count, max_seq_len = 1) on the buffers of any later step; segments of short
    # sequences get no tiles at all.
    case = make_case(
        [700, 5, 300], [1, 1, 1], num_heads=8, num_kv_heads=2, head_size=HEAD,
        rules=[(8, 0.25), (40, 0.0)], sink_tokens=4, elastic=elastic,
        prompt_lens=[650, 3, 280] if elastic == "prompt" else None, device=device, seed=21,
    )
    splits = choose_num_splits(3, 2, 1, None, torch.device(device))
    assert splits > 1
    assert_matches(dataclasses.replace(case, max_seq_len=1), num_splits=splits)


@pytest.mark.parametrize("head_size", [80, 128, 256])
def test_head_sizes(device, head_size):
    # padded to a power of two inside the kernel (80 -> 128); 128 is Llama-3's
    case = make_case([140, 60], [1, 17], num_heads=4, num_kv_heads=2, head_size=head_size,
                     rules=[(16, 0.25), (6, 0.0)], sink_tokens=3, transposed=True,
                     device=device, seed=head_size)
    assert_matches(case)
    assert_matches(case, num_splits=2)


@pytest.mark.parametrize("granule", [16, 64])
@pytest.mark.parametrize("elastic", ["position", "prompt"])
@pytest.mark.parametrize("sink_granules", [0, 1])
def test_granule_spans(device, granule, elastic, sink_granules):
    """Window starts rounded down to the granule: decode and a prefill chunk, a
    window narrower than the granule, sinks 0 and = granule, against the oracle."""
    case = make_case(
        [300, 170], [1, 45], num_heads=4, num_kv_heads=2, head_size=HEAD, block_size=16,
        rules=[(5, 0.0), (20, 0.25)], sink_tokens=sink_granules * granule, granule=granule,
        elastic=elastic, prompt_lens=[260, 150] if elastic == "prompt" else None,
        device=device, seed=granule + sink_granules,
    )
    out = assert_matches(case)
    assert_matches(case, num_splits=3)
    exact = dataclasses.replace(case, spans=dataclasses.replace(
        case.spans, params=dataclasses.replace(case.spans.params, granule=1)))
    assert (out - reference(exact)).abs().max() > 1e-3  # the granule does widen spans


@pytest.mark.parametrize("elastic", ["position", "prompt"])
def test_exact_floor(device, elastic):
    """Requests (prompt mode) or positions (position mode) at or below the exact
    floor read every key; the others their spans: decode and a prefill chunk."""
    case = make_case(
        [300, 170, 90], [1, 45, 1], num_heads=4, num_kv_heads=2, head_size=HEAD,
        block_size=16, rules=[(5, 0.0), (20, 0.25)], sink_tokens=16, granule=16,
        exact_floor=150, elastic=elastic,
        prompt_lens=[260, 150, 80] if elastic == "prompt" else None, device=device, seed=7,
    )
    out = assert_matches(case)
    assert_matches(case, num_splits=3)
    no_floor = dataclasses.replace(case, spans=dataclasses.replace(
        case.spans, params=dataclasses.replace(case.spans.params, exact_floor=0)))
    assert (out - reference(no_floor)).abs().max() > 1e-3  # the floor does widen spans


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("splits", [1, 3])
def test_fp8_cache(device, fp8, splits):
    """An fp8 cache (vLLM's per-tensor scales) against the oracle on the cache the
    kernel must see: each element times its scale. Decode and a prefill chunk."""
    case = make_case(
        [260, 120], [1, 30], num_heads=6, num_kv_heads=2, head_size=HEAD,
        rules=[(10, 0.125), (4, 0.0)], sink_tokens=3, transposed=True, device=device, seed=13,
    )
    k_scale, v_scale = 0.02, 0.05
    scales = torch.tensor([k_scale] * HEAD + [v_scale] * HEAD, device=device)
    stored = (case.kv_cache.float() / scales).to(fp8)
    dequantized = dataclasses.replace(case, kv_cache=stored.float() * scales)
    fp8_case = dataclasses.replace(case, kv_cache=stored)
    out = run_kernel(fp8_case, num_splits=splits,
                     k_scale=torch.tensor([k_scale], device=device),
                     v_scale=torch.tensor([v_scale], device=device)).cpu().float()
    assert (out - reference(dequantized)).abs().max() < 2e-4
    assert (out - reference(case)).abs().max() > 1e-3  # the fp8 rounding does show
