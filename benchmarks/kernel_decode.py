"""Decode benchmark of the MoA Triton kernel against vLLM's dense Triton attention.

Same paged KV cache for every kernel; per (batch, context):
  * ours, 25% and 50% plans (heterogeneous per-KV-head windows + 64 sinks),
  * ours, full-span plan (every window covers the sequence),
  * vLLM's ``unified_attention`` (dense, its own 2D/3D choice as in its backend),
  * ours, 50% plan in the head-class layout (every KV head its own one-head cache
    in one allocation, its own shuffled block table of a stacked table): one
    launch per layer (``heads1``) vs one launch per KV head (``headsN``).
Reported: median time (triton.testing.do_bench, L2 flushed between reps), ratio to
dense, achieved bandwidth = KV bytes the plan needs / time, and its share of the
device's peak. Writes ``benchmarks/results/kernel_decode_<tag>.{md,json}``.

``--smoke`` (automatic without CUDA) runs a tiny config under TRITON_INTERPRET=1,
so this script cannot rot.

Without an installed vLLM (the GPU box) the dense kernel is loaded from a vendored
copy of vLLM's ``triton_unified_attention.py`` + ``triton_attention_helpers.py``
(``--vendor`` folder, default ``.bench_vendor/``, git-ignored) with small shims.
"""

from __future__ import annotations

import argparse
import enum
import importlib.util
import json
import logging
import math
import os
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()

PEAK_BW = {  # bytes/s, datasheet HBM peaks
    "H100": 3.35e12,  # H100 SXM HBM3
    "H200": 4.8e12,
    "A100": 2.0e12,
}


def _setup_paths() -> None:
    kernels = str(ROOT / "triton_kernels")
    if kernels not in sys.path:
        sys.path.insert(0, kernels)


# --------------------------------------------------------------------------- dense
def _load_vendored_vllm(vendor: Path):
    """Import vLLM's Triton unified attention from a vendored copy with shims."""
    import triton
    import triton.language as tl

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    class KVQuantMode(enum.IntEnum):
        NONE = 0
        FP8_PER_TENSOR = 1
        INT8_PER_TOKEN_HEAD = 2
        FP8_PER_TOKEN_HEAD = 3
        INT4_PER_TOKEN_HEAD = 4
        NVFP4 = 5

    class _Platform:
        @staticmethod
        def fp8_dtype():
            return torch.float8_e4m3fn

        @staticmethod
        def is_device_capability_family(x):
            return False

    for pkg in ["vllm", "vllm.v1", "vllm.v1.attention", "vllm.v1.attention.ops"]:
        module(pkg, __path__=[])
    module("vllm.envs", VLLM_BATCH_INVARIANT=False)
    module("vllm.logger", init_logger=logging.getLogger)
    module("vllm.platforms", current_platform=_Platform())
    module("vllm.triton_utils", tl=tl, triton=triton)
    module("vllm.v1.kv_cache_interface", KVQuantMode=KVQuantMode)
    for name in ["triton_attention_helpers", "triton_unified_attention"]:
        full = f"vllm.v1.attention.ops.{name}"
        spec = importlib.util.spec_from_file_location(full, vendor / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[full] = mod
        spec.loader.exec_module(mod)
    return sys.modules["vllm.v1.attention.ops.triton_unified_attention"].unified_attention


def load_dense(vendor: Path, device: str):
    """vLLM's kernel: the installed vLLM on GPU; else its source files (vendored
    copy, or the installed vllm(-cpu) package's, whose import disables Triton on
    CPU) loaded with shims."""
    error = "no vLLM source found"
    if device == "cuda":
        try:
            from vllm.v1.attention.ops.triton_unified_attention import unified_attention

            return unified_attention, "vllm"
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
    candidates = [vendor]
    spec = importlib.util.find_spec("vllm")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / "v1" / "attention" / "ops")
    for folder in candidates:
        if (folder / "triton_unified_attention.py").exists():
            try:
                return _load_vendored_vllm(folder), f"source of {folder} with shims"
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
    return None, f"unavailable ({error})"


# --------------------------------------------------------------------------- plans
def make_rules(density: float, num_kv_heads: int):
    """Per-KV-head elastic rules (alpha=0, beta) whose windows average ``density``
    of the context, spread over [0.5, 1.5] x density; full span for density>=1."""
    if density >= 1.0:
        return [(2**30, 0.0)] * num_kv_heads
    if num_kv_heads == 1:
        return [(0, density)]
    return [
        (0, density * (0.5 + i / (num_kv_heads - 1))) for i in range(num_kv_heads)
    ]


def needed_tokens(rules, sink: int, min_window: int, seq_len: int) -> int:
    """Keys all KV heads need for the decode query at position seq_len-1."""
    from moa_vllm_span import window_size, quantize_beta  # type: ignore

    total = 0
    t = seq_len - 1
    for alpha, beta in rules:
        w = window_size(alpha, quantize_beta(beta), t + 1, min_window)
        start = max(sink, t - w + 1)
        total += min(sink, seq_len) + max(0, seq_len - start)
    return total


def _import_span_mask():
    """moa_vllm/span_mask.py of this checkout (torch only), installed or not."""
    return _checkout_module("moa_vllm_span", "span_mask.py")


def _checkout_module(name: str, path: str):
    """A torch-only module of this checkout's moa_vllm/, loaded by path (the GPU host
    has neither vLLM nor moa-vllm installed)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "moa_vllm" / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while executing
        spec.loader.exec_module(module)
    return sys.modules[name]


# --------------------------------------------------------------------------- timing
def bench(fn, device: str, graph: bool = True) -> float:
    """Median seconds of one call. On CUDA the call is captured in a CUDA graph and
    its replays are timed with do_bench (events, L2 flushed before each rep), so
    Python launch overhead does not count (vLLM decodes under CUDA graphs)."""
    if device == "cuda":
        import triton

        run = fn
        if graph:
            fn()  # compile outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BW.items():
        if key in name:
            return bw
    return None


def measure_copy_bw() -> float:
    import triton

    n = 1 << 28  # 256M bf16 = 512 MiB
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    t = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median")
    return 2 * a.numel() * a.element_size() / (t * 1e-3)


# --------------------------------------------------------------------------- main
def run(args) -> dict:
    from moa_kernels import span_attention_paged
    from moa_kernels.span_attention import TILE_SIZE, choose_num_splits

    span_mask = _import_span_mask()
    device = "cuda" if HAS_CUDA else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    dense, dense_src = load_dense(Path(args.vendor), device)
    H, Hkv, D, bs = args.num_heads, args.num_kv_heads, args.head_size, args.block_size
    sink, min_window = args.sink_tokens, 64 if not args.smoke else 4
    scale = D**-0.5
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)"
    peak = peak_bandwidth(dev_name) if device == "cuda" else None
    copy_bw = measure_copy_bw() if device == "cuda" else None
    print(f"device: {dev_name}; peak {peak and peak / 1e12} TB/s; "
          f"measured d2d copy {copy_bw and round(copy_bw / 1e12, 2)} TB/s; dense: {dense_src}")
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for ctx in args.contexts:
        for batch in args.batches:
            blocks_per_seq = math.ceil(ctx / bs)
            num_blocks = batch * blocks_per_seq
            # physical layout: "nhd" = [nb, bs, Hkv, 2D] (vLLM's), "hnd" = [nb, Hkv, bs, 2D]
            if args.layout == "nhd":
                phys = torch.empty(num_blocks, bs, Hkv, 2 * D, dtype=dtype, device=device)
                kv_cache = phys.transpose(1, 2)
            else:
                phys = torch.empty(num_blocks, Hkv, bs, 2 * D, dtype=dtype, device=device)
                kv_cache = phys
            phys.normal_()
            perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
            block_table = perm.view(batch, blocks_per_seq).to(device)
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
            qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
            query = torch.randn(batch, H, D, dtype=dtype, device=device)
            out = torch.empty_like(query)
            key_cache = kv_cache[..., :D].transpose(1, 2)  # [nb, bs, Hkv, D]
            value_cache = kv_cache[..., D:].transpose(1, 2)
            dense_bytes = batch * ctx * Hkv * 2 * D * query.element_size()
            row = {"batch": batch, "context": ctx, "dense_bytes": dense_bytes}

            t_dense = None
            out_dense = None
            if dense is not None:
                use_3d = batch <= 128 // Hkv
                segs = 16
                pad = 1 << (D - 1).bit_length()
                segm_out = torch.empty(batch, H, segs, pad, dtype=torch.float32, device=device)
                segm_max = torch.empty(batch, H, segs, dtype=torch.float32, device=device)
                segm_sum = torch.empty_like(segm_max)
                out_dense = torch.empty_like(query)

                def run_dense():
                    dense(
                        q=query, k=key_cache, v=value_cache, out=out_dense,
                        cu_seqlens_q=qsl, max_seqlen_q=1, seqused_k=seq_lens,
                        max_seqlen_k=ctx, softmax_scale=scale, causal=True,
                        window_size=(-1, -1), block_table=block_table, softcap=0,
                        q_descale=None, k_descale=None, v_descale=None,
                        seq_threshold_3D=128 // Hkv if use_3d else 0,
                        num_par_softmax_segments=segs, softmax_segm_output=segm_out,
                        softmax_segm_max=segm_max, softmax_segm_expsum=segm_sum,
                    )

                try:
                    t_dense = bench(run_dense, device, not args.eager)
                except Exception as exc:  # noqa: BLE001
                    print(f"dense failed: {type(exc).__name__}: {exc}")
                    dense = None
            row["dense_s"] = t_dense

            for label, density in [("moa25", 0.25), ("moa50", 0.5), ("full", 1.0)]:
                rules = make_rules(density, Hkv)
                alpha = torch.tensor([a for a, _ in rules], dtype=torch.int32, device=device)
                beta_q = torch.tensor([span_mask.quantize_beta(b) for _, b in rules],
                                      dtype=torch.int32, device=device)
                need = batch * needed_tokens(rules, sink, min_window, ctx)
                need_bytes = need * 2 * D * query.element_size()
                splits = args.splits

                def run_ours():
                    span_attention_paged(
                        query, kv_cache, block_table, qsl, seq_lens, alpha, beta_q, sink,
                        min_window, True, None, scale, out, 1, ctx, num_splits=splits,
                        tile_size=args.tile, num_warps=args.num_warps,
                    )

                t = bench(run_ours, device, not args.eager)
                r = {
                    "time_s": t,
                    "density": need_bytes / dense_bytes,
                    "bytes": need_bytes,
                    "bandwidth": need_bytes / t,
                    "splits": splits or choose_num_splits(batch, Hkv, 1, ctx, query.device,
                                                          args.tile or TILE_SIZE),
                }
                if t_dense:
                    r["ratio_to_dense"] = t / t_dense
                if peak:
                    r["pct_peak"] = 100 * need_bytes / t / peak
                if label == "full" and out_dense is not None:
                    run_ours()
                    r["max_abs_diff_vs_dense"] = (out.float() - out_dense.float()).abs().max().item()
                row[label] = r
            row.update(head_class_rows(args, batch, ctx, blocks_per_seq, query, out, g,
                                       span_mask, scale, sink, min_window, row["moa50"]))
            if t_dense:
                row["dense_bandwidth"] = dense_bytes / t_dense
                if peak:
                    row["dense_pct_peak"] = 100 * dense_bytes / t_dense / peak
            rows.append(row)
            print(format_row(row), flush=True)
            del phys, kv_cache, key_cache, value_cache
            if device == "cuda":
                torch.cuda.empty_cache()
    return {
        "provenance": _checkout_module("moa_vllm_machine", "evaluation/machine.py").provenance(),
        "device": dev_name,
        "peak_bandwidth": peak,
        "measured_copy_bandwidth": copy_bw,
        "dense_source": dense_src,
        "config": {
            "num_heads": H, "num_kv_heads": Hkv, "head_size": D, "block_size": bs,
            "dtype": str(dtype), "sink_tokens": sink, "min_window": min_window,
            "layout": args.layout, "tile": args.tile, "splits": args.splits,
            "smoke": args.smoke,
            "timing": "eager calls" if args.eager or device != "cuda" else
            "CUDA-graph replay, do_bench median, L2 flushed",
        },
        "rows": rows,
    }


def head_class_rows(args, batch, ctx, blocks_per_seq, query, out, g, span_mask, scale,
                    sink, min_window, shared) -> dict:
    """The 50% plan with every KV head in its own one-head cache and block table (the
    engine's head-class layout): one launch over all heads vs one launch per head."""
    from moa_kernels import span_attention_paged

    Hkv, D, bs = args.num_kv_heads, args.head_size, args.block_size
    device, dtype = query.device, query.dtype
    num_blocks = batch * blocks_per_seq
    caches = torch.empty(Hkv, num_blocks, 1, bs, 2 * D, dtype=dtype, device=device).normal_()
    tables = torch.stack([torch.randperm(num_blocks, generator=g).to(torch.int32)
                          .view(batch, blocks_per_seq) for _ in range(Hkv)]).to(device)
    heads = torch.arange(Hkv, dtype=torch.int32, device=device)
    offsets = heads.to(torch.int64) * caches[0].numel()
    rules = make_rules(0.5, Hkv)
    alpha = torch.tensor([a for a, _ in rules], dtype=torch.int32, device=device)
    beta_q = torch.tensor([span_mask.quantize_beta(b) for _, b in rules], dtype=torch.int32,
                          device=device)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    group = args.num_heads // Hkv
    common = dict(query_start_loc=qsl, seq_lens=seq_lens, sink_tokens=sink,
                  min_window=min_window, elastic_position=True, prompt_lens=None,
                  scale=scale, max_query_len=1, max_seq_len=ctx, num_splits=args.splits,
                  tile_size=args.tile, num_warps=args.num_warps)

    def one_launch():
        span_attention_paged(query=query, kv_cache=caches[0], block_table=tables,
                             alpha=alpha, beta_q=beta_q, output=out, head_tables=heads,
                             head_offsets=offsets, **common)

    def per_head():
        for h in range(Hkv):
            rows = slice(h * group, (h + 1) * group)
            span_attention_paged(query=query[:, rows], kv_cache=caches[h],
                                 block_table=tables[h], alpha=alpha[h:h + 1],
                                 beta_q=beta_q[h:h + 1], output=out[:, rows], **common)

    result = {}
    for label, fn in [("heads1", one_launch), ("headsN", per_head)]:
        t = bench(fn, device.type, not args.eager)
        result[label] = {"time_s": t, "bandwidth": shared["bytes"] / t,
                         "ratio_to_shared": t / shared["time_s"]}
    return result


def _us(t):
    return f"{t * 1e6:9.1f}" if t else "      n/a"


def format_row(row) -> str:
    parts = [f"B={row['batch']:4d} ctx={row['context']:6d} dense {_us(row['dense_s'])} us"]
    for label in ["moa25", "moa50", "full"]:
        r = row[label]
        ratio = f"{r['ratio_to_dense']:.2f}" if "ratio_to_dense" in r else "n/a"
        pct = f"{r['pct_peak']:.0f}%" if "pct_peak" in r else "n/a"
        parts.append(f"{label} {_us(r['time_s'])} us x{ratio} ({pct})")
    parts += [f"{label} {_us(row[label]['time_s'])} us" for label in ["heads1", "headsN"]]
    return " | ".join(parts)


def markdown(result) -> str:
    lines = [
        f"# Decode kernel benchmark: {result['device']}",
        "",
        *_checkout_module("moa_vllm_machine", "evaluation/machine.py").provenance_lines(
            result["provenance"]),
        f"Config: {json.dumps(result['config'])}  ",
        f"Peak bandwidth used for %: {result['peak_bandwidth'] and result['peak_bandwidth'] / 1e12} TB/s; "
        f"measured device-to-device copy: "
        f"{result['measured_copy_bandwidth'] and round(result['measured_copy_bandwidth'] / 1e12, 2)} TB/s; "
        f"dense baseline: vLLM unified_attention ({result['dense_source']}).",
        "",
        f"Timing: {result['config']['timing']}. Times are medians (us). ratio = time / dense time. BW = KV bytes the plan needs / time "
        "(TB/s), % = of peak. density = needed KV bytes / dense KV bytes.",
        "",
        "| batch | context | dense us | dense BW (%) | 25%: dens, us, ratio, BW (%) | "
        "50%: dens, us, ratio, BW (%) | full: us, ratio, BW (%) | splits 25/50/full | "
        "50% head classes, one launch: us, vs shared | 50% head classes, launch per head: "
        "us, vs shared |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def bw(b, p):
        return f"{b / 1e12:.2f} ({p:.0f}%)" if p is not None else f"{b / 1e12:.3g}"

    for row in result["rows"]:
        cells = [str(row["batch"]), str(row["context"])]
        if row["dense_s"]:
            cells += [f"{row['dense_s'] * 1e6:.1f}", bw(row["dense_bandwidth"], row.get("dense_pct_peak"))]
        else:
            cells += ["n/a", "n/a"]
        for label in ["moa25", "moa50", "full"]:
            r = row[label]
            ratio = f"{r['ratio_to_dense']:.2f}" if "ratio_to_dense" in r else "n/a"
            dens = f"{r['density']:.3f}, " if label != "full" else ""
            cells.append(f"{dens}{r['time_s'] * 1e6:.1f}, {ratio}, {bw(r['bandwidth'], r.get('pct_peak'))}")
        cells.append("/".join(str(row[label]["splits"]) for label in ["moa25", "moa50", "full"]))
        cells += [f"{row[label]['time_s'] * 1e6:.1f}, {row[label]['ratio_to_shared']:.2f}"
                  for label in ["heads1", "headsN"]]
        lines.append("| " + " | ".join(cells) + " |")
    diffs = [row["full"].get("max_abs_diff_vs_dense") for row in result["rows"]]
    diffs = [d for d in diffs if d is not None]
    if diffs:
        lines += ["", f"Full-span output vs dense output: max abs diff {max(diffs):.2e}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny config under the interpreter")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--sink-tokens", type=int, default=64)
    p.add_argument("--layout", choices=["nhd", "hnd"], default="hnd",
                   help="physical cache layout: hnd = contiguous logical [nb, Hkv, bs, 2D]; "
                   "nhd = [nb, bs, Hkv, 2D] transposed (CPU-style)")
    p.add_argument("--eager", action="store_true", help="time eager calls, no CUDA graph")
    p.add_argument("--splits", type=int, default=None, help="force num_splits (default: heuristic)")
    p.add_argument("--tile", type=int, default=None)
    p.add_argument("--num-warps", type=int, default=None)
    p.add_argument("--vendor", default=str(ROOT / ".bench_vendor"))
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    if not HAS_CUDA:
        args.smoke = True
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    if args.smoke:  # tiny config (on the GPU when there is one)
        args.batches, args.contexts = [1, 3], [96]
        args.num_heads, args.num_kv_heads, args.head_size = 4, 2, 32
        args.sink_tokens = 8
    _setup_paths()
    result = run(args)
    tag = args.tag or ("smoke" if args.smoke else
                       result["device"].replace("NVIDIA ", "").replace(" ", "_"))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"kernel_decode_{tag}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out_dir / f"kernel_decode_{tag}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
