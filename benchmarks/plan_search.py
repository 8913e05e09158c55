"""MILP solve times of `moa-vllm plan search` on random profiles (not a test).

Problems: a Llama-3-8B-sized one (32 layers x 8 KV heads x ~48 rules x 4 lengths
(objectives at 2k/4k/8k/16k, densities also at 32k), random importance) and the
SmolLM2-135M one (30 x 3 x ~48 rules, objectives at 1k/2k/4k, densities at
1k/2k/4k/6k/8k). Goal: < 60 s for the 8B single solve.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/plan_search.py [--sweep]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from moa_vllm.planner.milp import Assigner, pareto_sweep
from moa_vllm.planner.synthetic import random_problem
from moa_vllm.span_classes import num_span_classes

PROBLEMS = {
    "llama3-8b": dict(layers=32, heads=8, lengths=[2048, 4096, 8192, 16384],
                      density_lengths=[2048, 4096, 8192, 16384, 32768], max_context=32768),
    "smollm2-135m": dict(layers=30, heads=3, lengths=[1024, 2048, 4096],
                         density_lengths=[1024, 2048, 4096, 6144, 8192], max_context=8192),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--time-limit", type=float, default=60)
    ap.add_argument("--gap", type=float, default=5e-3)
    ap.add_argument("--sweep", action="store_true", help="also time a Pareto sweep (grid 2)")
    args = ap.parse_args()
    rows = []
    for name, spec in PROBLEMS.items():
        t0 = time.perf_counter()
        prob, rules = random_problem(spec["layers"], spec["heads"], spec["lengths"], spec["density_lengths"],
                                     args.density, spec["max_context"], seed=0)
        build = time.perf_counter() - t0
        a = Assigner(prob, None, args.time_limit, args.gap)
        w = np.zeros(len(spec["lengths"]))
        w[-1] = 1
        t0 = time.perf_counter()
        relax = a.choose_partition(w)
        t_relax = time.perf_counter() - t0
        t0 = time.perf_counter()
        sol = a.solve(w)
        t_solve = time.perf_counter() - t0
        row = {
            "problem": name,
            "shape": f"{spec['layers']}x{spec['heads']}x{len(rules)}x{len(spec['lengths'])}",
            "classes": num_span_classes(spec["layers"], 4),
            "profile+build s": round(build, 1),
            "relaxation s": round(t_relax, 1) if relax is not None else "-",
            "class MILP s": round(t_solve, 1),
            "single solve s": round(t_relax + t_solve, 1),
            "status": sol.status,
            "gap": None if sol.mip_gap is None else f"{sol.mip_gap:.2%}",
        }
        if args.sweep:
            a2 = Assigner(prob, None, args.time_limit, args.gap)
            t0 = time.perf_counter()
            front, log = pareto_sweep(a2, grid=2, progress=False)
            row["sweep s"] = round(time.perf_counter() - t0, 1)
            row["sweep solves"] = len(log)
            row["pareto plans"] = len(front)
        rows.append(row)
        print(row, flush=True)
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r.get(k))) for r in rows)) for k in keys]
    print()
    print(" | ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(r.get(k)).ljust(w) for k, w in zip(keys, widths)))


if __name__ == "__main__":
    main()
