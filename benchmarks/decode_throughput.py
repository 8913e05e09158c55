"""Decode throughput and KV memory: dense vLLM vs the MoA backend, same requests,
back to back in one invocation, same KV budget.

For each prompt length L: N requests of L random tokens, 128 output tokens each
(ignore_eos). Reported per backend: output tokens/s over the whole run, decode
tokens/s over the steps that only decode (every request past its prompt), the
prefill time (until every request has its first token), peak concurrent requests,
KV bytes held per request at steady decode (read from vLLM's block pool) and its
fraction of the dense need, and the MoA/dense ratios.

Dense runs vLLM's own default block size (CPU: 128), what a dense user gets; MoA
runs the block size it chooses itself when none is given (``engine/block_choice``),
or ``--moa-block-size``.

CPU (this machine): SmolLM2 + a shipped plan. The smoke test runs it on the tiny
model at 1k tokens.

Peak concurrent requests measure admission only when requests overlap: with a
chunk (`--max-num-batched-tokens`) small against the prompt, one prompt prefills at
a time, so the output must outlast the next prompts' prefill (e.g. 8k prompts,
chunk 512, 64 output tokens) or a third request never meets the first two.

    python benchmarks/decode_throughput.py --model .models/smollm2 \\
        --plan plans/smollm2-135m-moa-0.5.json --lengths 2048,4096,8192
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read the block pool
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moa_vllm.evaluation.machine import provenance, provenance_lines  # noqa: E402
BUDGET_BLOCK = 128  # tokens: the KV budget holds whole dense blocks of vLLM's CPU default


def run_backend(model: str, plan: str | None, length: int, requests: int, out_tokens: int,
                kv_bytes: int, dtype: str, max_num_seqs: int, max_num_batched_tokens: int,
                moa_block_size: int | None = None, seed: int = 0,
                kv_cache_dtype: str = "auto") -> dict:
    """One engine's run; ``moa_block_size`` None: the block size MoA chooses."""
    from vllm import LLM, SamplingParams

    options = dict(model=model, dtype=dtype, enforce_eager=True, seed=0,
                   max_model_len=length + out_tokens + 16, max_num_seqs=max_num_seqs,
                   kv_cache_memory_bytes=kv_bytes, kv_cache_dtype=kv_cache_dtype,
                   max_num_batched_tokens=max_num_batched_tokens)
    if plan:
        llm = LLM(attention_backend="moa", block_size=moa_block_size,
                  additional_config={"moa": {"plan": str(Path(plan).resolve())}}, **options)
    else:
        llm = LLM(**options)  # vLLM's own block size, what a dense user runs (CPU: 128)
    from moa_vllm.engine.vllm_surface.entrypoints import (
        llm_block_size,
        llm_scheduler,
        shutdown_llm,
    )

    block_size = llm_block_size(llm)

    engine = llm.llm_engine
    sched = llm_scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    total_blocks = pool.num_gpu_blocks - 1  # the null block
    bytes_per_block = kv_bytes / total_blocks
    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_tokens=out_tokens, ignore_eos=True)
    for i in range(requests):
        ids = [rng.randrange(200, 30000) for _ in range(length)]
        engine.add_request(f"r{i}", {"prompt_token_ids": ids}, params)
    peak, held, start = 0, [], time.time()
    prefill_seconds, decode_seconds, decode_tokens = None, 0.0, 0
    while engine.has_unfinished_requests():
        batch = len(sched.running)
        decoding = not sched.waiting and all(r.num_output_tokens >= 1 for r in sched.running)
        if decoding and prefill_seconds is None:
            prefill_seconds = time.time() - start
        step_start = time.perf_counter()
        engine.step()
        if decoding:  # a step of single-token decodes only: one token per request
            decode_seconds += time.perf_counter() - step_start
            decode_tokens += batch
        running = list(sched.running)
        peak = max(peak, len(running))
        if running and all(r.num_output_tokens >= 8 for r in running):
            used = total_blocks - pool.get_num_free_blocks()
            held.append(used * bytes_per_block / len(running))
    elapsed = time.time() - start
    shutdown_llm(llm)
    return {"output_tokens_per_s": requests * out_tokens / elapsed, "seconds": elapsed,
            "decode_tokens_per_s": decode_tokens / decode_seconds if decode_seconds else 0.0,
            "prefill_seconds": prefill_seconds, "peak_running": peak,
            "kv_bytes_per_request": sum(held) / max(1, len(held)), "samples": len(held),
            "block_size": block_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--out-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--dense-requests-fit", type=float, default=2.0,
                    help="KV budget: this many dense requests of the longest kind")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048,
                    help="the prefill chunk; MoA's admission cap holds two chunks in flight, "
                         "so a small chunk against the prompt admits more MoA requests")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="both engines' KV cache (e.g. fp8: MoA fp8 against dense fp8)")
    ap.add_argument("--moa-block-size", type=int,
                    help="the MoA engine's block size (default: the one MoA chooses)")
    ap.add_argument("--torch-path", action="store_true",
                    help="also run MoA on our torch path (MOA_CPU_ATTN=torch: how every CPU "
                         "step ran before attention moved to vLLM's op), for its prefill and "
                         "decode")
    ap.add_argument("--out", default="benchmarks/results/decode_throughput")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of other lengths already in --out")
    args = ap.parse_args()
    from moa_vllm.envs import MOA_CPU_ATTN
    from moa_vllm.evaluation.runner import kv_bytes_per_token
    from moa_vllm.plan import load_plan
    from moa_vllm.span_classes import allocated_density

    from transformers import AutoConfig

    plan = load_plan(args.plan)
    out = Path(args.out)
    max_len = AutoConfig.from_pretrained(args.model).max_position_embeddings
    rows = []
    if args.append and Path(f"{out}.json").is_file():
        rows = json.loads(Path(f"{out}.json").read_text())["rows"]
    for asked in [int(x) for x in args.lengths.split(",")]:
        length = min(asked, max_len - args.out_tokens - 16)  # prompt + output must fit
        rows = [r for r in rows if r["length"] != length]
        per_token = kv_bytes_per_token(args.model, args.dtype, args.kv_cache_dtype)
        need = per_token * (length + args.out_tokens)
        # whole blocks of dense's largest default (CPU: 128 tokens), plus the null block
        held = -(-(length + args.out_tokens) // BUDGET_BLOCK) * BUDGET_BLOCK
        kv_bytes = int(per_token * (args.dense_requests_fit * held + BUDGET_BLOCK))
        row = {"length": length, "provenance": provenance([args.plan]),
               "kv_budget_bytes": kv_bytes, "dense_kv_bytes_per_request": need}
        backends = [("dense", None, "vllm"), ("moa", args.plan, "vllm")]
        if args.torch_path:
            backends.append(("moa_torch", args.plan, "torch"))
        for name, p, path in backends:
            os.environ[MOA_CPU_ATTN] = path
            row[name] = run_backend(args.model, p, length, args.requests, args.out_tokens,
                                    kv_bytes, args.dtype, args.max_num_seqs,
                                    args.max_num_batched_tokens, args.moa_block_size,
                                    kv_cache_dtype=args.kv_cache_dtype)
            row[name]["kv_fraction_of_dense"] = row[name]["kv_bytes_per_request"] / need
            print(json.dumps({name: row[name], "length": length}), flush=True)
        row["predicted_allocated_density"] = allocated_density(
            plan, length + args.out_tokens, row["moa"]["block_size"])
        row["throughput_ratio"] = (row["moa"]["output_tokens_per_s"]
                                   / row["dense"]["output_tokens_per_s"])
        row["decode_ratio"] = (row["moa"]["decode_tokens_per_s"]
                               / max(row["dense"]["decode_tokens_per_s"], 1e-9))
        if args.torch_path:
            row["torch_path_decode_ratio"] = (row["moa_torch"]["decode_tokens_per_s"]
                                              / max(row["dense"]["decode_tokens_per_s"], 1e-9))
        rows.append(row)
        write_results(args, sorted(rows, key=lambda r: r["length"]), out)
    return 0


def _seconds(value: float | None) -> str:
    """A run with fewer than two output tokens never reaches a decode-only step."""
    return "-" if value is None else f"{value:.1f}"


def _torch_path(row: dict) -> str:
    if "moa_torch" not in row:
        return "-"
    return (f"{row['torch_path_decode_ratio']:.2f}, "
            f"{_seconds(row['moa_torch']['prefill_seconds'])}")


def write_results(args, rows: list[dict], out: Path) -> None:
    result = {"model": args.model, "plan": args.plan, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    runs = {json.dumps(r["provenance"], sort_keys=True): [] for r in rows}  # --append: several
    for r in rows:
        runs[json.dumps(r["provenance"], sort_keys=True)].append(str(r["length"]))
    lines = [line for run, lengths in runs.items()
             for line in [f"L = {', '.join(lengths)}:  ", *provenance_lines(json.loads(run)), ""]]
    lines += ["| L | block dense / MoA | decode tok/s dense / MoA | decode ratio | "
             "prefill s dense / MoA | overall tok/s dense / MoA | ratio | peak reqs dense/MoA | "
             "KV/request dense | KV/request MoA (fraction) | predicted allocated | "
             "torch path: decode ratio, prefill s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, m = r["dense"], r["moa"]
        lines.append(
            f"| {r['length']} | {d['block_size']} / {m['block_size']} "
            f"| {d['decode_tokens_per_s']:.1f} / {m['decode_tokens_per_s']:.1f} "
            f"| {r['decode_ratio']:.2f} | {_seconds(d['prefill_seconds'])} / "
            f"{_seconds(m['prefill_seconds'])} "
            f"| {d['output_tokens_per_s']:.1f} / {m['output_tokens_per_s']:.1f} "
            f"| {r['throughput_ratio']:.2f} | {d['peak_running']}/{m['peak_running']} | "
            f"{d['kv_bytes_per_request'] / 2**20:.1f} MiB | "
            f"{m['kv_bytes_per_request'] / 2**20:.1f} MiB ({m['kv_fraction_of_dense']:.2f}) | "
            f"{r['predicted_allocated_density']:.2f} | {_torch_path(r)} |")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
