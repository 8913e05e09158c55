"""Paged MoA span attention in Triton: one kernel family for decode and prefill.

Every KV head has its own window rule ``W = max(min_window, alpha +
ceil(beta_q * N / BETA_SCALE))`` plus ``sink_tokens`` always-kept keys; a query at
absolute position ``t`` reads key ``j`` iff ``j <= t`` and (``j < sink_tokens`` or
``j >= floor((t - W + 1) / granule) * granule``). ``N`` is ``t + 1`` (elastic
"position") or the request's prompt length (elastic "prompt"); while
``N <= exact_floor`` a query reads every key.

Layout of the work (after vLLM's ``triton_unified_attention``, own code):

* program ``(q_block, kv_head[, segment])``: ``BLOCK_M`` rows = ``BLOCK_Q`` query
  tokens x the ``group`` query heads sharing one KV head (GQA packing), so each
  K/V tile is loaded once per KV head and used by the whole group;
* the key loop visits only the *sink tiles* (``[0, sink_tokens)``) and the
  *window tiles* (from the window start of the widest row of the program up to
  its last query): tiles in between are never loaded. Inside partial tiles the
  loads (block-table entries included) are masked, so a position outside the span
  of the program's rows is never read (freed blocks may hold other data);
* split-KV ("segments") for decode with little parallelism: the visited tiles of a
  program are cut into ``num_splits`` segments, each writes a partial (max, sum,
  acc) and a reduce kernel combines them.

The launch grid only depends on tensor shapes and host integers (no host sync), so
uniform single-token decode can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

BETA_SCALE = 4096  # must match moa_vllm.span_mask.BETA_SCALE
FULL_WINDOW = tl.constexpr(1 << 30)  # must match moa_vllm.span_mask.FULL_WINDOW
LOG2E = 1.4426950408889634
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
              torch.float8_e5m2fnuz)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _find_seq(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q: tl.constexpr):
    """Request owning global q-block ``q_block_global`` (binary search over
    ``query_start_loc[i] // BLOCK_Q + i``, the first q-block of request ``i``)."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= q_block_global:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _span_attention_kernel(
    out_ptr,  # [T, H, D] (2D path)
    segm_out_ptr,  # [T, H, NUM_SEGMENTS, HEAD_SIZE_PADDED] fp32 (split path)
    segm_max_ptr,  # [T, H, NUM_SEGMENTS] fp32
    segm_sum_ptr,  # [T, H, NUM_SEGMENTS] fp32
    q_ptr,
    kv_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    prompt_lens_ptr,
    alpha_ptr,
    beta_q_ptr,
    head_table_ptr,  # [num_kv_heads] int32: row of the stacked block tables (PER_HEAD)
    head_offset_ptr,  # [num_kv_heads] int64: element offset of each head's cache (PER_HEAD)
    k_scale_ptr,  # [1] fp32: K's dequantization scale (KV_FP8)
    v_scale_ptr,  # [1] fp32: V's dequantization scale (KV_FP8)
    sink_tokens,
    min_window,
    exact_floor,  # N <= exact_floor: every key (span_mask.FULL_WINDOW)
    granule,
    qk_scale,  # softmax scale * log2(e)
    num_seqs,
    stride_q0,
    stride_q1,
    stride_q2,
    stride_o0,
    stride_o1,
    stride_o2,
    stride_btg,
    stride_bt0,
    stride_kv0,
    stride_kv1,
    stride_kv2,
    stride_kv3,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_SIZE_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    ELASTIC_POSITION: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: do the dots in fp32 (bf16 dot is broken there)
    DOT_IEEE: tl.constexpr,  # fp32 inputs: exact fp32 dots instead of tf32
    BETA_DEN: tl.constexpr,
    PER_HEAD: tl.constexpr,  # head classes: each KV head its own cache and block table
    KV_FP8: tl.constexpr,  # fp8 cache: K and V dequantized on load (element * scale)
):
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    seq = _find_seq(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = q_block_global - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_SIZE_PADDED)
    offs_t = tl.arange(0, TILE)
    q_local = q_block * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (q_local < q_len)
    dim_valid = offs_d < HEAD_SIZE
    q_row = (q_start + q_local).to(tl.int64)

    q = tl.load(
        q_ptr + q_row[:, None] * stride_q0 + head[:, None] * stride_q1
        + offs_d[None, :] * stride_q2,
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    # ---- windows of this program's rows (integer arithmetic, like LayerSpans) ----
    t_pos = context_len + q_local  # absolute position of each row's query
    alpha = tl.load(alpha_ptr + kv_head).to(tl.int64)
    beta_q = tl.load(beta_q_ptr + kv_head).to(tl.int64)
    if ELASTIC_POSITION:
        n = (t_pos + 1).to(tl.int64)
    else:
        n = tl.zeros([BLOCK_M], dtype=tl.int64) + tl.load(prompt_lens_ptr + seq).to(tl.int64)
    bn = beta_q * n
    # ceil(bn / BETA_DEN) with divisions of non-negative numbers only
    ceil_bn = tl.where(bn >= 0, (bn + (BETA_DEN - 1)) // BETA_DEN, -((-bn) // BETA_DEN))
    window = tl.maximum(alpha + ceil_bn, min_window)  # [BLOCK_M] int64
    window = tl.where(n <= exact_floor, FULL_WINDOW, window)
    t64 = t_pos.to(tl.int64)

    # ---- loop bounds: sink tiles, then window tiles ----
    last_q = tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len) - 1
    hi = context_len + last_q + 1  # one past the last key any row reads
    # window start rounded down to the granule (clamped at 0 first: // truncates)
    start = tl.maximum(t64 - window + 1, 0) // granule * granule
    row_start = tl.where(row_valid, start, hi)
    win_lo = tl.maximum(tl.min(row_start, axis=0), 0).to(tl.int32)
    sink_end = tl.minimum(sink_tokens, hi)
    n_sink_tiles = (sink_end + TILE - 1) // TILE
    win_tile_lo = tl.maximum(win_lo // TILE, n_sink_tiles)
    win_tile_hi = (hi + TILE - 1) // TILE
    n_win_tiles = tl.maximum(win_tile_hi - win_tile_lo, 0)
    total_tiles = n_sink_tiles + n_win_tiles
    if IS_SPLIT:
        per_segment = (total_tiles + NUM_SEGMENTS - 1) // NUM_SEGMENTS
        it_lo = segment * per_segment
        it_hi = tl.minimum(it_lo + per_segment, total_tiles)
    else:
        it_lo = 0
        it_hi = total_tiles

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE_PADDED], dtype=tl.float32)

    if KV_FP8:
        k_scale = tl.load(k_scale_ptr).to(tl.float32)
        v_scale = tl.load(v_scale_ptr).to(tl.float32)
    if PER_HEAD:
        bt_row = (block_table_ptr + tl.load(head_table_ptr + kv_head).to(tl.int64) * stride_btg
                  + seq.to(tl.int64) * stride_bt0)
        kv_head_off = tl.load(head_offset_ptr + kv_head)
    else:
        bt_row = block_table_ptr + seq.to(tl.int64) * stride_bt0
        kv_head_off = kv_head.to(tl.int64) * stride_kv1
    for it in range(it_lo, it_hi):
        tile = tl.where(it < n_sink_tiles, it, it - n_sink_tiles + win_tile_lo)
        k_pos = tile * TILE + offs_t
        # keys some row of this program may read: never load anything else
        k_load = (k_pos < sink_end) | ((k_pos >= win_lo) & (k_pos < hi))
        blk = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_load, other=0).to(tl.int64)
        kv_off = blk * stride_kv0 + kv_head_off + (k_pos % BLOCK_SIZE).to(tl.int64) * stride_kv2
        k = tl.load(
            kv_ptr + kv_off[None, :] + offs_d[:, None] * stride_kv3,
            mask=k_load[None, :] & dim_valid[:, None],
            other=0.0,
        )  # [D, TILE]
        v = tl.load(
            kv_ptr + kv_off[:, None] + (offs_d[None, :] + HEAD_SIZE) * stride_kv3,
            mask=k_load[:, None] & dim_valid[None, :],
            other=0.0,
        )  # [TILE, D]
        if KV_FP8:
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if DOT_IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * qk_scale
        kp = k_pos.to(tl.int64)[None, :]
        allowed = (
            row_valid[:, None]
            & k_load[None, :]
            & (kp <= t64[:, None])
            & ((kp < sink_tokens) | (kp >= start[:, None]))
        )
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_new = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp2(s - m_new[:, None])
        corr = tl.exp2(m_i - m_new)
        l_i = l_i * corr + tl.sum(p, axis=1)
        acc = acc * corr[:, None]
        if DOT_IEEE:
            acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if IS_SPLIT:
        row_off = q_row * NUM_HEADS + head  # [BLOCK_M] index of (token, head)
        tl.store(
            segm_out_ptr + (row_off * NUM_SEGMENTS + segment)[:, None] * HEAD_SIZE_PADDED
            + offs_d[None, :],
            acc,
            mask=row_valid[:, None],
        )
        tl.store(segm_max_ptr + row_off * NUM_SEGMENTS + segment, m_i, mask=row_valid)
        tl.store(segm_sum_ptr + row_off * NUM_SEGMENTS + segment, l_i, mask=row_valid)
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        tl.store(
            out_ptr + q_row[:, None] * stride_o0 + head[:, None] * stride_o1
            + offs_d[None, :] * stride_o2,
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )


@triton.jit
def _reduce_segments_kernel(
    out_ptr,
    segm_out_ptr,
    segm_max_ptr,
    segm_sum_ptr,
    stride_o0,
    stride_o1,
    stride_o2,
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_SIZE_PADDED: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    SEGMENTS_PADDED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = token * NUM_HEADS + head
    offs_s = tl.arange(0, SEGMENTS_PADDED)
    offs_d = tl.arange(0, HEAD_SIZE_PADDED)
    s_valid = offs_s < NUM_SEGMENTS
    m_s = tl.load(segm_max_ptr + row * NUM_SEGMENTS + offs_s, mask=s_valid, other=float("-inf"))
    l_s = tl.load(segm_sum_ptr + row * NUM_SEGMENTS + offs_s, mask=s_valid, other=0.0)
    m = tl.max(m_s, axis=0)
    m = tl.where(m > float("-inf"), m, 0.0)
    w = tl.where(m_s > float("-inf"), tl.exp2(m_s - m), 0.0)
    l_tot = tl.sum(w * l_s, axis=0)
    acc_s = tl.load(
        segm_out_ptr + (row * NUM_SEGMENTS + offs_s)[:, None] * HEAD_SIZE_PADDED + offs_d[None, :],
        mask=s_valid[:, None],
        other=0.0,
    )
    acc = tl.sum(acc_s * w[:, None], axis=0)
    l_safe = tl.where(l_tot > 0.0, l_tot, 1.0)
    out = acc / l_safe
    tl.store(
        out_ptr + token * stride_o0 + head * stride_o1 + offs_d * stride_o2,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_SIZE,
    )


TILE_SIZE = 32  # keys per loop iteration (decode and prefill)

# Split-KV heuristic knobs (decode only).
_SPLIT_TILE_MIN = 4  # at least this many tiles of the longest sequence per segment
_MAX_SEGMENTS = 64
_PROGRAMS_PER_SM = 8  # programs wanted in flight per SM (latency hiding)


@functools.lru_cache(maxsize=None)
def _num_sms_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _num_sms_cached(index)
    return 8


def choose_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_query_len: int,
    max_seq_len: int | None,
    device: torch.device,
    tile: int = TILE_SIZE,
) -> int:
    """Segments per program for decode: enough programs to fill the device, each
    with at least ``_SPLIT_TILE_MIN`` tiles of the longest sequence when its
    length is known (``None``: a CUDA graph that replays at any length). Host
    integers only (no sync)."""
    if max_query_len != 1:
        return 1
    programs = max(num_seqs * num_kv_heads, 1)
    target = _PROGRAMS_PER_SM * _num_sms(device)
    if programs >= target:
        return 1
    splits = min(_MAX_SEGMENTS, triton.cdiv(target, programs))
    if max_seq_len is not None:
        splits = min(splits, max(1, max_seq_len // (tile * _SPLIT_TILE_MIN)))
    return max(1, triton.next_power_of_2(splits) if splits > 1 else 1)


def span_attention_paged(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    alpha: torch.Tensor,
    beta_q: torch.Tensor,
    sink_tokens: int,
    min_window: int,
    elastic_position: bool,
    prompt_lens: torch.Tensor | None,
    scale: float,
    output: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    *,
    head_tables: torch.Tensor | None = None,
    head_offsets: torch.Tensor | None = None,
    granule: int = 1,
    exact_floor: int = 0,
    num_splits: int | None = None,
    tile_size: int | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """MoA attention over vLLM's paged KV cache, written into ``output``.

    ``kv_cache`` is the logical ``[num_blocks, num_kv_heads, block_size, 2 * D]``
    view (K then V in the last dim), any strides. An fp8 cache (``float8_e4m3fn``,
    ``float8_e5m2``) is dequantized on load with the one-element fp32 tensors
    ``k_scale`` / ``v_scale`` (device tensors: no host sync, graph-safe).

    Head classes (``head_offsets`` given): every KV head has its own one-head
    cache in the same allocation as ``kv_cache`` (head 0's), at element offset
    ``head_offsets[h]`` from ``kv_cache``'s first element, and its own block table
    ``block_table[head_tables[h]]`` of a stacked ``[groups, seqs, blocks]`` table.

    ``num_splits`` forces the path:
    1 = one program per (q-block, KV head), >1 = split-KV with that many segments
    (decode and prefill alike); ``None`` picks by a heuristic (split only for
    decode batches with few programs). The other keyword arguments override the
    tuning defaults.
    """
    num_tokens, num_heads, head_size = query.shape
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    per_head = head_offsets is not None
    if per_head:
        assert num_kv_heads == 1 and block_table.dim() == 3 and head_tables is not None
        num_kv_heads = head_offsets.shape[0]
    assert two_d == 2 * head_size, "kv_cache last dim must be 2 * head_size"
    assert num_heads % num_kv_heads == 0
    assert output.shape == query.shape
    if not elastic_position:
        assert prompt_lens is not None, "elastic 'prompt' needs prompt_lens"
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return
    group = num_heads // num_kv_heads
    interp = _interpreting()
    kv_fp8 = kv_cache.dtype in FP8_DTYPES
    if kv_fp8:
        assert k_scale is not None and v_scale is not None, "an fp8 cache needs its scales"
    head_size_padded = triton.next_power_of_2(head_size)

    decode = max_query_len == 1
    if block_m is None:
        block_m = 16 if decode else 64
    block_m = max(block_m, triton.next_power_of_2(group), 16)
    block_q = block_m // group
    if tile_size is None:
        tile_size = TILE_SIZE
    if num_splits is None:
        num_splits = choose_num_splits(
            num_seqs, num_kv_heads, max_query_len, max_seq_len, query.device, tile_size
        )
    is_split = num_splits > 1
    num_q_blocks = num_tokens // block_q + num_seqs  # upper bound, no sync
    grid = (num_q_blocks, num_kv_heads, num_splits)

    if is_split:
        segm_out = torch.empty(
            (num_tokens, num_heads, num_splits, head_size_padded),
            dtype=torch.float32, device=query.device,
        )
        segm_max = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32,
                               device=query.device)
        segm_sum = torch.empty_like(segm_max)
    else:
        segm_out = segm_max = segm_sum = output  # unused

    launch = {}
    if num_warps is not None:
        launch["num_warps"] = num_warps
    if num_stages is not None:
        launch["num_stages"] = num_stages
    _span_attention_kernel[grid](
        output, segm_out, segm_max, segm_sum,
        query, kv_cache, block_table, query_start_loc, seq_lens,
        prompt_lens if prompt_lens is not None else seq_lens,
        alpha, beta_q,
        head_tables if per_head else alpha, head_offsets if per_head else alpha,
        k_scale if kv_fp8 else alpha, v_scale if kv_fp8 else alpha,
        int(sink_tokens), int(min_window), int(exact_floor), int(granule),
        float(scale) * LOG2E, num_seqs,
        query.stride(0), query.stride(1), query.stride(2),
        output.stride(0), output.stride(1), output.stride(2),
        block_table.stride(0) if per_head else 0, block_table.stride(-2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_HEADS=num_heads,
        GROUP=group,
        HEAD_SIZE=head_size,
        HEAD_SIZE_PADDED=head_size_padded,
        BLOCK_SIZE=block_size,
        TILE=tile_size,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        ELASTIC_POSITION=bool(elastic_position),
        NUM_SEGMENTS=num_splits,
        IS_SPLIT=is_split,
        UPCAST=interp,
        DOT_IEEE=query.dtype == torch.float32 and not interp,
        BETA_DEN=BETA_SCALE,
        PER_HEAD=per_head,
        KV_FP8=kv_fp8,
        **launch,
    )
    if is_split:
        _reduce_segments_kernel[(num_tokens, num_heads)](
            output, segm_out, segm_max, segm_sum,
            output.stride(0), output.stride(1), output.stride(2),
            NUM_HEADS=num_heads,
            HEAD_SIZE=head_size,
            HEAD_SIZE_PADDED=head_size_padded,
            NUM_SEGMENTS=num_splits,
            SEGMENTS_PADDED=triton.next_power_of_2(num_splits),
        )
