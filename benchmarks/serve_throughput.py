"""Serving throughput at equal KV memory: stock vLLM against MoA, each an OpenAI
server started with ``vllm serve`` under one ``--kv-cache-memory-bytes``, one after
the other, driven by vLLM's own client (``vllm bench serve``, random dataset, more
requests than dense can hold at once).

Each server runs at its own block size (vLLM's default for dense; MoA's choice).
While the client runs, ``/metrics`` gives the most requests running at once,
preemptions, and the pool's use per running request. One table: output tok/s,
TTFT and TPOT (median, p99), peak running requests, preemptions, KV per request,
and the "maximum concurrency" each server logged at start-up.

    python benchmarks/serve_throughput.py --model .models/smollm2 \\
        --plan moa-0.5=plans/smollm2-135m-moa-0.5.json \\
        --plan moa-0.25=plans/smollm2-135m-moa-0.25.json --lengths 4000,7800 \\
        --out benchmarks/results/serve_throughput_cpu

``--smoke`` (in ``make test``) runs it on a tiny model with a given plan at short
lengths.
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
    ratios,
)

DENSE_BLOCK = 128  # vLLM's CPU default: the budget holds whole dense blocks
COLUMNS = [("server", "server", "s"), ("prompt", "prompt", "d"),
           ("completed", "completed", "d"), ("output tok/s", "output_tok_s", ".1f"),
           ("TTFT median s", "ttft_median_s", ".1f"), ("TTFT p99 s", "ttft_p99_s", ".1f"),
           ("TPOT median ms", "tpot_median_ms", ".0f"), ("TPOT p99 ms", "tpot_p99_ms", ".0f"),
           ("peak running", "peak_running", "d"), ("preemptions", "preemptions", "d"),
           ("KV MiB / request", "kv_mib_per_request", ".1f"),
           ("logged max concurrency", "logged_max_concurrency", ".2f")]
RATIO_KEYS = ["output_tok_s", "ttft_median_s", "ttft_p99_s", "tpot_median_ms", "tpot_p99_ms",
              "peak_running", "kv_mib_per_request", "logged_max_concurrency"]


def run_server(name: str, args, length: int, budget: int, server_args: list[str],
               logs: Path) -> dict:
    common = ["--kv-cache-memory-bytes", str(budget), "--dtype", args.dtype,
              "--max-model-len", str(length + args.output_len), *args.server_args]
    bench = ["--dataset-name", "random", "--random-input-len", str(length),
             "--random-output-len", str(args.output_len), "--ignore-eos",
             "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.num_prompts),
             "--seed", "0"]
    with Server(args.model, common + server_args, logs / f"{name}-{length}.log") as server:
        row = measure(server, args.model, bench, budget)
    return {"server": name, "prompt": length, "requested": args.num_prompts,
            "kv_budget_bytes": budget, **row}


def write_results(args, rows: list[dict], out: Path) -> None:
    meta = {"provenance": provenance(args.plan), "model": str(args.model), "plans": args.plan, "dtype": args.dtype,
            "output_len": args.output_len, "num_prompts": args.num_prompts,
            "dense_requests_in_budget": args.dense_requests}
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    dense = {r["prompt"]: r for r in rows if r["server"] == "dense"}
    ratio_rows = [{"server": f"{r['server']} / dense", "prompt": r["prompt"],
                   **{k: f"{v:.2f}x" if v else None
                      for k, v in ratios(r, dense[r["prompt"]], RATIO_KEYS).items()}}
                  for r in rows if r["server"] != "dense"]
    ratio_columns = [(t, k, "s" if k in RATIO_KEYS else spec) for t, k, spec in COLUMNS
                     if k in RATIO_KEYS or k in ("server", "prompt")]
    lines = ["# Serving throughput at equal KV memory", "",
             *provenance_lines(meta["provenance"]), "",
             f"`vllm serve` under one `--kv-cache-memory-bytes` per prompt length (about "
             f"{args.dense_requests} dense requests), `--dtype {args.dtype}`; "
             f"`vllm bench serve --dataset-name random`, {args.num_prompts} prompts at once, "
             f"{args.output_len} output tokens each (`--ignore-eos`).", "",
             *markdown_table(rows, COLUMNS), "", *markdown_table(ratio_rows, ratio_columns)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--plan", action="append", required=True, metavar="[NAME=]PATH",
                        help="a MoA server's plan (repeat: one server each)")
    parser.add_argument("--lengths", default="2000,4000,7800", help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=384)
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--dense-requests", type=int, default=4,
                        help="the KV budget: this many dense requests at full length")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="more `vllm serve` arguments for both servers (last)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true",
                        help="short: 6 prompts of 300 tokens, 32 out, 2 dense in budget")
    args = parser.parse_args()
    if args.smoke:
        args.lengths, args.output_len, args.num_prompts, args.dense_requests = "300", 32, 6, 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    logs = args.out.parent / f"{args.out.name}-logs"
    logs.mkdir(exist_ok=True)
    rows = []
    for length in map(int, args.lengths.split(",")):
        budget = dense_budget_bytes(args.model, args.dtype, args.dense_requests,
                                    length + args.output_len, DENSE_BLOCK)
        for name, extra in (("dense", []), *map(moa_server_args, args.plan)):
            rows.append(run_server(name, args, length, budget, extra, logs))
    write_results(args, rows, args.out)
    return 0 if all(r["completed"] == args.num_prompts for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
