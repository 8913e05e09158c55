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
import time
from pathlib import Path

from moa_vllm.evaluation.machine import machine
from moa_vllm.evaluation.served import Sampler, Server, bench_serve, dense_budget_bytes

DENSE_BLOCK = 128  # vLLM's CPU default: the budget holds whole dense blocks
COLUMNS = ("server", "prompt", "completed", "output tok/s", "TTFT median s", "TTFT p99 s",
           "TPOT median ms", "TPOT p99 ms", "peak running", "preemptions",
           "KV MiB / request", "logged max concurrency")


def run_server(name: str, args, length: int, budget: int, server_args: list[str],
               out: Path) -> dict:
    common = ["--kv-cache-memory-bytes", str(budget), "--dtype", args.dtype,
              "--max-model-len", str(length + args.output_len), *args.server_args]
    with Server(args.model, common + server_args, out / f"{name}-{length}.log") as server:
        bench = ["--dataset-name", "random", "--random-input-len", str(length),
                 "--random-output-len", str(args.output_len), "--ignore-eos",
                 "--num-prompts", str(args.num_prompts),
                 "--max-concurrency", str(args.num_prompts), "--seed", "0"]
        with Sampler(server.base, budget) as sampler:
            result = bench_serve(server.base, args.model, bench)
        kv = sorted(sampler.kv_per_request)
        return {
            "server": name, "prompt": length, "completed": result["completed"],
            "failed": result.get("failed", 0),
            "output_tok_s": result["output_throughput"],
            "ttft_median_s": result["median_ttft_ms"] / 1e3,
            "ttft_p99_s": result["p99_ttft_ms"] / 1e3,
            "tpot_median_ms": result["median_tpot_ms"], "tpot_p99_ms": result["p99_tpot_ms"],
            "peak_running": sampler.peak_running, "preemptions": int(sampler.preemptions),
            "kv_mib_per_request": kv[len(kv) // 2] / 2**20 if kv else None,
            "logged_max_concurrency": server.max_concurrency_logged(),
            "block_size": server.logged(r"MoA: KV block size (\d+)") or "vLLM default",
        }


def plans(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``[NAME=]PATH`` -> (name, the MoA server's arguments)."""
    out = []
    for spec in specs:
        name, _, path = spec.rpartition("=")
        config = json.dumps({"moa": {"plan": str(Path(path).resolve())}})
        out.append((name or Path(path).stem, ["--attention-backend", "moa",
                                              "--additional-config", config]))
    return out


def cells(row: dict) -> list[str]:
    def f(value, spec):
        return "-" if value is None else format(value, spec)

    return [row["server"], str(row["prompt"]), f"{row['completed']}/{row['requested']}",
            f(row["output_tok_s"], ".1f"), f(row["ttft_median_s"], ".1f"),
            f(row["ttft_p99_s"], ".1f"), f(row["tpot_median_ms"], ".0f"),
            f(row["tpot_p99_ms"], ".0f"), str(row["peak_running"]), str(row["preemptions"]),
            f(row["kv_mib_per_request"], ".1f"), f(row["logged_max_concurrency"], ".2f")]


def ratio_cells(moa: dict, dense: dict) -> list[str]:
    def r(key):
        return f"{moa[key] / dense[key]:.2f}x" if moa[key] and dense[key] else "-"

    return [f"{moa['server']} / dense", str(moa["prompt"]), "", r("output_tok_s"), r("ttft_median_s"),
            r("ttft_p99_s"), r("tpot_median_ms"), r("tpot_p99_ms"), r("peak_running"), "",
            r("kv_mib_per_request"), r("logged_max_concurrency")]


def write_results(args, rows: list[dict], out: Path, argv: list[str]) -> None:
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": " ".join(argv),
            "model": str(args.model), "plan": args.plan, "dtype": args.dtype,
            "output_len": args.output_len, "num_prompts": args.num_prompts,
            "dense_requests_in_budget": args.dense_requests}
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    lines = [f"# Serving throughput at equal KV memory ({meta['date']})", "",
             f"Machine: {meta['machine']}. Command: `{meta['command']}`.", "",
             f"`vllm serve` under one `--kv-cache-memory-bytes` per prompt length (about "
             f"{args.dense_requests} dense requests), `--dtype {args.dtype}`; "
             f"`vllm bench serve --dataset-name random`, {args.num_prompts} prompts at once, "
             f"{args.output_len} output tokens each (`--ignore-eos`).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(cells(row)) + " |")
    for row in rows:
        if row["server"] != "dense":
            base = next(d for d in rows if d["server"] == "dense" and d["prompt"] == row["prompt"])
            lines.append("| " + " | ".join(ratio_cells(row, base)) + " |")
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
        for name, extra in (("dense", []), *plans(args.plan)):
            row = run_server(name, args, length, budget, extra, logs)
            rows.append({**row, "requested": args.num_prompts, "kv_budget_bytes": budget})
    write_results(args, rows, args.out, ["python", *sys.argv])
    return 0 if all(r["completed"] == args.num_prompts for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
