"""What a searched plan records of its search (``provenance.details``): the budgets,
the solver's log, the Pareto front with its validation, the retrieval sweep, the
profiles and the time each stage took."""

from __future__ import annotations

import os

from moa_vllm.plan import Plan
from moa_vllm.plan_report import density_table
from moa_vllm.planner.lengths import SearchLengths
from moa_vllm.planner.search_config import SearchConfig
from moa_vllm.planner.selection import LengthScores, Retrieval
from moa_vllm.planner.stages import RETRIEVAL_TASK, SearchRun


def density_record(cfg: SearchConfig, lengths: SearchLengths, rules, front, solve_log,
                   scores: dict[int, LengthScores], best: int, relative: list[float]) -> dict:
    """The search at one density: budgets, solver, Pareto front and validation."""
    return {
        "density": cfg.density,
        "allocated_density_budget": cfg.allocated_budget,
        "budget_slack": cfg.budget_slack,
        "density_lengths": lengths.density,
        "rules_grid": [r.as_tuple() for r in rules],
        "solver": {"name": "scipy.optimize.milp (HiGHS)", "time_limit_s": cfg.time_limit,
                   "mip_rel_gap": cfg.mip_rel_gap, "pareto_grid": cfg.pareto_grid,
                   "solves": solve_log,
                   "total_solver_s": round(sum(e["seconds"] for e in solve_log), 2)},
        "pareto": [{"objectives": [round(float(x), 6) for x in o],
                    "validation_losses": {str(n): round(s.plans[i], 6)
                                          for n, s in scores.items()},
                    "excess_vs_uniform": round(relative[i], 6) if relative else None}
                   for i, (_, o) in enumerate(front)],
        "validation": {
            "lengths": lengths.validate, "samples": lengths.validate_samples, "chosen": best,
            "excess_vs_uniform": relative[best] if relative else None,
            "per_length": {str(n): {"dense_loss": s.dense, "uniform_loss": s.uniform,
                                    "chosen_loss": s.plans[best]}
                           for n, s in scores.items()}},
    }


def retrieval_step(cfg: SearchConfig, chosen: Retrieval) -> dict:
    """One density of the retrieval sweep: the plan's recall beside dense's."""
    return {"density": cfg.density, "solved": chosen.solved, "kept": round(chosen.kept, 4),
            "meets_target": chosen.meets(cfg.retrieval_target)}


def run_record(cfg: SearchConfig, run: SearchRun, baseline: Retrieval, sweep: list[dict],
               profile_info: dict, total_seconds: float) -> dict:
    """The whole search: the retrieval sweep, profiles, data, timings, machine."""
    lengths = run.lengths
    return {
        "retrieval": {"task": RETRIEVAL_TASK, "lengths": lengths.validate,
                      "prompts_per_length": cfg.retrieval_samples, "seed": cfg.seed,
                      "dense_solved": baseline.dense, "prompts": baseline.prompts,
                      "target": cfg.retrieval_target, "sweep": sweep,
                      "density_chosen_by": "auto" if cfg.density == "auto" else "given"},
        "block_size": cfg.block_size,
        "profile_lengths": lengths.profile,
        "profile_block": cfg.profile_block,
        "samples_per_length": dict(zip(map(str, lengths.profile), lengths.samples)),
        "profiles": {str(n): profile_info[n] for n in lengths.profile},
        "data": {"source": cfg.dataset or "synthetic (pydoc_data.topics): facts, passages, topics",
                 "targets": "dense model greedy answers" if not cfg.dataset
                 else "dataset answers or dense greedy",
                 "answer_tokens": cfg.answer_tokens, "seed": cfg.seed},
        "head_classes": run.num_classes,
        "stage_seconds": run.cache.seconds,
        "cached_stage_seconds": run.cache.cached_seconds,
        "total_seconds": total_seconds,
        "threads": run.threads,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "machine": f"{os.cpu_count()} CPUs",
    }


def density_rows(plan: Plan, lengths: list[int], block_size: int) -> list[dict]:
    """The plan's average and allocated density at the search's density lengths."""
    return [{"length": d.length, "average": round(d.average_density, 5),
             "allocated": round(d.allocated_density, 5)}
            for d in density_table(plan, lengths, block_size)]
