"""Prefix caching under MoA, served: stock vLLM (prefix caching on, its default)
and MoA servers (a position-elastic plan with caching on and off; a prompt-elastic
plan, which serves without it), one after the other under one
``--kv-cache-memory-bytes``, each driven by ``vllm bench serve`` on a
prefix-sharing workload (``--dataset-name prefix_repetition``: a few long shared
prefixes, each request one of them plus its own suffix).

One table: TTFT (median, p99), output tok/s, the prefix-cache hit rate from vLLM's
own ``vllm:prefix_cache_hits`` / ``queries``, KV per running request and peak
running requests from ``/metrics``.

    python benchmarks/prefix_serving.py --model .models/smollm2 \\
        --plan moa-0.5=plans/smollm2-135m-moa-0.5.json \\
        --plan moa-0.5-position=plans/smollm2-135m-moa-0.5-position.json \\
        --out benchmarks/results/prefix_serving_cpu

``--smoke`` (in ``make test``) runs it short, on the model and plans given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moa_vllm.evaluation.machine import provenance, provenance_lines
from moa_vllm.evaluation.served import (
    Server,
    dense_budget_bytes,
    markdown_table,
    measure,
    moa_server_args,
)
from moa_vllm.plan import load_plan

DENSE_BLOCK = 128  # vLLM's CPU default: the budget holds whole dense blocks
COLUMNS = [("server", "server", "s"), ("prefix caching", "caching", "s"),
           ("completed", "completed", "d"), ("prefix hit rate", "prefix_hit_rate", ".2f"),
           ("TTFT median s", "ttft_median_s", ".2f"), ("TTFT p99 s", "ttft_p99_s", ".2f"),
           ("output tok/s", "output_tok_s", ".1f"), ("TPOT median ms", "tpot_median_ms", ".0f"),
           ("peak running", "peak_running", "d"), ("preemptions", "preemptions", "d"),
           ("KV MiB / request", "kv_mib_per_request", ".1f")]


def servers(plan_specs: list[str]) -> list[tuple[str, str, list[str]]]:
    """(name, caching, arguments): dense, then each plan with caching on and off
    where its elastic mode keeps caching (position), else as it serves."""
    out = [("dense", "on", [])]
    for spec in plan_specs:
        name, args = moa_server_args(spec)
        if load_plan(spec.rpartition("=")[2]).elastic == "position":
            out += [(name, "on", args), (name, "off", args + ["--no-enable-prefix-caching"])]
        else:
            out.append((name, "off (prompt-elastic plan)", args))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--plan", action="append", required=True, metavar="[NAME=]PATH")
    parser.add_argument("--prefix-len", type=int, default=3500)
    parser.add_argument("--suffix-len", type=int, default=500)
    parser.add_argument("--num-prefixes", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--dense-requests", type=int, default=6,
                        help="the KV budget: this many dense requests at full length")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true",
                        help="short: 8 prompts, 2 prefixes of 256 tokens, 32-token suffixes")
    args = parser.parse_args()
    if args.smoke:
        args.prefix_len, args.suffix_len, args.num_prefixes = 256, 32, 2
        args.output_len, args.num_prompts, args.max_concurrency = 16, 8, 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logs = args.out.parent / f"{args.out.name}-logs"
    logs.mkdir(exist_ok=True)
    length = args.prefix_len + args.suffix_len + args.output_len
    budget = dense_budget_bytes(args.model, args.dtype, args.dense_requests, length,
                                DENSE_BLOCK)
    bench = ["--dataset-name", "prefix_repetition",
             "--prefix-repetition-prefix-len", str(args.prefix_len),
             "--prefix-repetition-suffix-len", str(args.suffix_len),
             "--prefix-repetition-num-prefixes", str(args.num_prefixes),
             "--prefix-repetition-output-len", str(args.output_len), "--ignore-eos",
             "--num-prompts", str(args.num_prompts),
             "--max-concurrency", str(args.max_concurrency), "--seed", "0"]
    rows = []
    for name, caching, extra in servers(args.plan):
        server_args = ["--kv-cache-memory-bytes", str(budget), "--dtype", args.dtype,
                       "--max-model-len", str(length), *args.server_args, *extra]
        log = logs / f"{name}-caching-{caching.split()[0]}.log"
        with Server(args.model, server_args, log) as server:
            row = measure(server, args.model, bench, budget)
        rows.append({"server": name, "caching": caching, "requested": args.num_prompts, **row})
    meta = {"provenance": provenance(args.plan), "model": str(args.model),
            "plans": args.plan, "dtype": args.dtype, "kv_budget_bytes": budget,
            "workload": {k: getattr(args, k) for k in ("prefix_len", "suffix_len",
                                                        "num_prefixes", "output_len",
                                                        "num_prompts", "max_concurrency")}}
    args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = ["# Prefix caching, served", "", *provenance_lines(meta["provenance"]), "",
             f"`vllm serve` under one `--kv-cache-memory-bytes` ({args.dense_requests} dense "
             f"requests of {length} tokens), `--dtype {args.dtype}`; `vllm bench serve "
             f"--dataset-name prefix_repetition`: {args.num_prefixes} prefixes of "
             f"{args.prefix_len} tokens, {args.suffix_len}-token suffixes, "
             f"{args.output_len} output tokens, {args.num_prompts} prompts, "
             f"{args.max_concurrency} at once.", "", *markdown_table(rows, COLUMNS)]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["completed"] == args.num_prompts for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
