"""Which KV block size MoA should choose: MoA's decode and prefill at every block
size that divides the plan's granule, against dense vLLM at its own default block
size, one run, one machine (``engine/block_choice`` encodes the answer).

For each length: dense (vLLM's default block size), MoA at each candidate, and MoA
with no block size (its own choice), the same requests and KV budget as
``decode_throughput.py`` (whose ``run_backend`` runs each engine).

    python benchmarks/block_size.py --model .models/smollm2 \\
        --plan plans/smollm2-135m-moa-0.5.json --lengths 2048,4096 \\
        --out benchmarks/results/block_size_cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moa_vllm.evaluation.machine import provenance, provenance_lines

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_throughput import BUDGET_BLOCK, run_backend  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--block-sizes", default=None,
                    help="MoA's candidates (default: every one that divides the granule)")
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--out-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="benchmarks/results/block_size_cpu")
    args = ap.parse_args()
    from moa_vllm.engine.block_choice import fits
    from moa_vllm.evaluation.runner import kv_bytes_per_token
    from moa_vllm.plan import load_plan

    plan = load_plan(args.plan)
    sizes = ([int(b) for b in args.block_sizes.split(",")] if args.block_sizes
             else fits(plan.granule, args.plan))
    per_token = kv_bytes_per_token(args.model, args.dtype)
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        held = -(-(length + args.out_tokens) // BUDGET_BLOCK) * BUDGET_BLOCK
        kv_bytes = int(per_token * (args.requests * held + BUDGET_BLOCK))  # all fit
        runs = {"dense": (None, None)} | {f"moa@{b}": (args.plan, b) for b in sizes} \
            | {"moa (its choice)": (args.plan, None)}
        row = {"length": length, "runs": {}}
        for name, (p, block_size) in runs.items():
            row["runs"][name] = run_backend(
                args.model, p, length, args.requests, args.out_tokens, kv_bytes, args.dtype,
                args.requests, 2048, block_size)
            print(json.dumps({name: row["runs"][name], "length": length}), flush=True)
        rows.append(row)
        write_results(args, rows)
    return 0


def write_results(args, rows: list[dict]) -> None:
    out = Path(args.out)
    result = {"provenance": provenance([args.plan]), "model": args.model, "plan": args.plan,
              "dtype": args.dtype, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    lines = [*provenance_lines(result["provenance"]), "",
             f"({args.dtype}, {args.requests} requests, {args.out_tokens} output tokens "
             "each; ratios to dense at vLLM's default block size)", "",
             "| L | engine | block size | decode tok/s | decode ratio | prefill s | "
             "prefill time ratio |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        dense = row["runs"]["dense"]
        for name, run in row["runs"].items():
            lines.append(
                f"| {row['length']} | {name} | {run['block_size']} | "
                f"{run['decode_tokens_per_s']:.1f} | "
                f"{run['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f} | "
                f"{run['prefill_seconds']:.1f} | "
                f"{run['prefill_seconds'] / dense['prefill_seconds']:.2f} |")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
