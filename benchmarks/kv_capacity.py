"""KV capacity from vLLM's block pool: dense and MoA, each with the model's KV
cache dtype and with an fp8 cache, under one KV budget, in one run.

For each of the four engines: the KV bytes one request holds at steady decode
(its live blocks in every KV-cache group, read from the block pool) at each
prompt length, and the "maximum concurrency" vLLM logs at start-up for
``--max-model-len`` tokens per request under ``--kv-cache-memory-bytes``. Dense
runs vLLM's own backend at its default block size; MoA the block size it
chooses. Requests run one at a time (capacity, not speed).

    python benchmarks/kv_capacity.py --model .models/smollm2 \\
        --plan plans/smollm2-135m-moa-0.5-position.json --out benchmarks/results/kv_capacity_cpu

``--smoke``: the tiny model, 512- and 1024-token prompts (``make test``). On a CPU
whose vLLM op holds no fp8 cache (it needs AVX-512 or AMX) the fp8 engines are left
out, and the results say why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read the block pool
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moa_vllm.evaluation.machine import provenance, provenance_lines  # noqa: E402
from moa_vllm.evaluation.served import markdown_table  # noqa: E402

ENGINES = [("dense", False, "auto"), ("dense", False, "fp8"),
           ("MoA", True, "auto"), ("MoA", True, "fp8")]


def measure(model: str, plan: str | None, cache_dtype: str, lengths: list[int],
            max_model_len: int, kv_bytes: int, dtype: str) -> dict:
    """One engine: its logged maximum concurrency and each length's KV per request."""
    from vllm import LLM, SamplingParams

    from moa_vllm.engine.vllm_surface.entrypoints import (
        llm_block_size,
        llm_max_concurrency,
        llm_scheduler,
        shutdown_llm,
    )
    from moa_vllm.engine.vllm_surface.kv_manager import request_kv_bytes

    options = dict(model=model, dtype=dtype, enforce_eager=True, seed=0,
                   max_model_len=max_model_len, kv_cache_memory_bytes=kv_bytes,
                   kv_cache_dtype=cache_dtype, max_num_seqs=1)
    if plan:
        options.update(attention_backend="moa",
                       additional_config={"moa": {"plan": str(Path(plan).resolve())}})
    llm = LLM(**options)
    engine, scheduler = llm.llm_engine, llm_scheduler(llm)
    row = {"block_size": llm_block_size(llm), "logged_max_concurrency": llm_max_concurrency(llm)}
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for length in lengths:
        rid = f"kv-{length}"
        engine.add_request(rid, {"prompt_token_ids": [(7 * i) % 20000 + 200
                                                      for i in range(length)]}, params)
        held = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if not out.finished and len(out.outputs[0].token_ids) >= 2:
                    held = request_kv_bytes(scheduler, rid)  # steady decode
        row[f"kv_mib_{length}"] = held / 2**20
    shutdown_llm(llm)
    return row


def fp8_refusal(model: str, dtype: str) -> str | None:
    """Why vLLM's CPU attention op holds no fp8 cache for this model on this CPU
    (None where it does, and on CUDA)."""
    import torch
    from transformers import AutoConfig

    from moa_vllm.engine.vllm_surface.ops import cpu_cache_refusal
    from moa_vllm.plan import fingerprint_from_hf_config

    if torch.cuda.is_available():
        return None
    head_dim = fingerprint_from_hf_config(AutoConfig.from_pretrained(model)).head_dim
    return cpu_cache_refusal(getattr(torch, dtype), 32, head_dim, "fp8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--lengths", default="2048,8000",
                    help="prompt lengths (each request also decodes 8 tokens)")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--kv-cache-memory-bytes", type=int, default=512 << 20)
    ap.add_argument("--dtype", default="bfloat16", help="the model's dtype ('auto' cache)")
    ap.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    ap.add_argument("--smoke", action="store_true", help="512 and 1024 tokens")
    args = ap.parse_args()
    lengths = [512, 1024] if args.smoke else [int(x) for x in args.lengths.split(",")]
    max_model_len = max(lengths) + 64 if args.smoke else args.max_model_len
    fp8_not_measured = fp8_refusal(args.model, args.dtype)
    rows = []
    for name, moa, cache_dtype in ENGINES:
        if cache_dtype == "fp8" and fp8_not_measured:
            continue
        row = {"engine": name, "kv_cache_dtype": cache_dtype if cache_dtype != "auto"
               else f"auto ({args.dtype})"}
        row.update(measure(args.model, args.plan if moa else None, cache_dtype, lengths,
                           max_model_len, args.kv_cache_memory_bytes, args.dtype))
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    for row in rows:
        for length in lengths:
            row[f"fraction_{length}"] = row[f"kv_mib_{length}"] / base[f"kv_mib_{length}"]
        row["concurrency_ratio"] = row["logged_max_concurrency"] / base["logged_max_concurrency"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"provenance": provenance([args.plan]), "model": args.model, "plan": args.plan,
              "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
              "max_model_len": max_model_len, "fp8_not_measured": fp8_not_measured,
              "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    columns = [("engine", "engine", ""), ("KV cache", "kv_cache_dtype", ""),
               ("block", "block_size", "d")]
    for length in lengths:
        columns += [(f"KV MiB / request at {length}", f"kv_mib_{length}", ".2f"),
                    (f"of dense {args.dtype}", f"fraction_{length}", ".2f")]
    columns += [(f"logged max concurrency at {max_model_len}", "logged_max_concurrency", ".2f"),
                ("of dense", "concurrency_ratio", ".2f")]
    lines = [*provenance_lines(result["provenance"]), "",
             f"One KV budget ({args.kv_cache_memory_bytes / 2**20:.0f} MiB); KV per request "
             "from the block pool at steady decode.", "", *markdown_table(rows, columns)]
    if fp8_not_measured:
        lines += ["", f"fp8 KV cache: not measured on this CPU ({fp8_not_measured})."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
