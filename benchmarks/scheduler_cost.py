"""What head classes cost the engine: one decode step, and the scheduler's part of
it, for 1 class vs more (the same rules, ``max_head_classes`` changed and the
classes derived), side by side in one run, as ratios to 1 class.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/scheduler_cost.py \\
        --model .models/smollm2 --plan plans/smollm2-135m-moa-0.5.json

Batch 4, 2k-token prompts, bf16, 64 decode steps timed after 8 warm-up steps.
Writes ``benchmarks/results/scheduler_cost_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # time the scheduler in-process
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def time_steps(model: str, plan_path: str, length: int, batch: int, steps: int) -> dict:
    from vllm import LLM, SamplingParams

    from moa_vllm.engine.engine_plan import EnginePlan
    from moa_vllm.engine.vllm_surface.entrypoints import llm_scheduler, shutdown_llm

    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, seed=0, block_size=16,
              max_model_len=length + steps + 32, max_num_seqs=batch,
              max_num_batched_tokens=4096, attention_backend="moa",
              additional_config={"moa": {"plan": plan_path}})
    engine, sched = llm.llm_engine, llm_scheduler(llm)
    classes = len(EnginePlan.from_config(engine.vllm_config).head_classes)
    scheduled = []
    original = sched.schedule

    def timed_schedule(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        scheduled.append(time.perf_counter() - t0)
        return out

    sched.schedule = timed_schedule
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=steps + 16, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"r{i}", {"prompt_token_ids": [rng.randrange(200, 30000)
                                                          for _ in range(length)]}, params)
    while not (sched.running and all(r.num_output_tokens >= 8 for r in sched.running)
               and len(sched.running) == batch):
        engine.step()
    scheduled.clear()
    step_times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - t0)
    shutdown_llm(llm)
    return {"classes": classes, "step_ms": 1e3 * statistics.median(step_times),
            "schedule_ms": 1e3 * statistics.median(scheduled)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--classes", default="1,9,18", help="max_head_classes to compare")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/scheduler_cost_cpu")
    args = ap.parse_args()
    from moa_vllm.plan import load_plan

    plan = load_plan(args.plan)
    tmp = Path(tempfile.mkdtemp(prefix="moa-classes-"))
    rows = []
    for k in [int(x) for x in args.classes.split(",")]:
        path = tmp / f"plan-{k}.json"
        plan.model_copy(update={"max_head_classes": k, "head_classes": None}).save(path)
        rows.append(time_steps(args.model, str(path), args.length, args.batch, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows:
        r["step_ratio"] = r["step_ms"] / base["step_ms"]
        r["schedule_ratio"] = r["schedule_ms"] / base["schedule_ms"]
    from moa_vllm.evaluation.machine import provenance, provenance_lines

    result = {"provenance": provenance([args.plan]), "length": args.length, "batch": args.batch, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    lines = [*provenance_lines(result["provenance"]), "",
             "| head classes | decode step (ms, median) | vs 1 class | schedule() (ms) | "
             "vs 1 class |", "|---|---|---|---|---|"]
    lines += [f"| {r['classes']} | {r['step_ms']:.1f} | {r['step_ratio']:.2f} | "
              f"{r['schedule_ms']:.2f} | {r['schedule_ratio']:.2f} |" for r in rows]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
