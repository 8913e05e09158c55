"""MILP solve times of `moa-vllm plan search` on random profiles (not a test).

Problems: a Llama-3-8B-sized one (32 layers x 8 KV heads = 256 slots, ~50 rules,
objectives at 512/2k/8k/16k, densities at 256 up to its 32k context, 8 head
classes) and the SmolLM2-135M one (30 x 3 = 90 slots, objectives at
512/1k/2k/4k, densities 256 up to 8k, 9 head classes). Goal: < 60 s for the 8B
single solve.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/plan_search.py [--sweep]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from moa_vllm.evaluation.machine import provenance, provenance_lines
from moa_vllm.planner.milp import HeadClassMILP, pareto_sweep
from moa_vllm.planner.synthetic import random_problem
from moa_vllm.span_classes import objective_lengths

PROBLEMS = {
    "llama3-8b": dict(layers=32, heads=8, lengths=[512, 2048, 8192, 16384], max_context=32768),
    "smollm2-135m": dict(layers=30, heads=3, lengths=[512, 1024, 2048, 4096], max_context=8192),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--classes", type=int, default=9, help="head classes at most")
    ap.add_argument("--time-limit", type=float, default=60)
    ap.add_argument("--gap", type=float, default=5e-3)
    ap.add_argument("--sweep", action="store_true", help="also time a Pareto sweep (grid 2)")
    args = ap.parse_args()
    rows = []
    for name, spec in PROBLEMS.items():
        t0 = time.perf_counter()
        density_lengths = sorted({256, *spec["lengths"], *objective_lengths(spec["max_context"])})
        prob, rules = random_problem(spec["layers"], spec["heads"], spec["lengths"],
                                     density_lengths, args.density, spec["max_context"], seed=0,
                                     max_head_classes=args.classes)
        build = time.perf_counter() - t0
        w = np.zeros(len(spec["lengths"]))
        w[-1] = 1
        t0 = time.perf_counter()
        sol = HeadClassMILP(prob, None, args.time_limit, args.gap).solve(w)
        row = {
            "problem": name,
            "shape": f"{spec['layers'] * spec['heads']} slots x {len(rules)} rules x "
                     f"{len(spec['lengths'])} lengths",
            "classes": prob.num_classes,
            "density lengths": len(density_lengths),
            "profile+build s": round(build, 1),
            "single solve s": round(time.perf_counter() - t0, 1),
            "status": sol.status,
            "gap": None if sol.mip_gap is None else f"{sol.mip_gap:.2%}",
        }
        if args.sweep:
            t0 = time.perf_counter()
            front, log = pareto_sweep(HeadClassMILP(prob, None, args.time_limit, args.gap),
                                      grid=2, progress=False)
            row["sweep s"] = round(time.perf_counter() - t0, 1)
            row["sweep solves"] = len(log)
            row["pareto plans"] = len(front)
        rows.append(row)
        print(row, flush=True)
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r.get(k))) for r in rows)) for k in keys]
    print()
    print("\n".join(provenance_lines(provenance())), end="\n\n")
    print(" | ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(r.get(k)).ljust(w) for k, w in zip(keys, widths)))


if __name__ == "__main__":
    main()
