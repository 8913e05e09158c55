"""`moa-vllm plan search`: the stages (``planner.stages``) in order, at one density
or, with ``--density auto``, at rising budgets until a plan retrieves what dense
does; the choice (``planner.selection``) and the plan's record
(``planner.search_record``). Options: ``planner.search_config``; lengths:
``planner.lengths``; the cache of every stage: ``planner.stage_cache``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from moa_vllm.plan import Plan, fingerprint_from_hf_config, uniform_plan
from moa_vllm.planner import stages
from moa_vllm.planner.lengths import SearchLengths, resolve_lengths
from moa_vllm.planner.search_config import SearchConfig
from moa_vllm.planner.search_record import (
    density_record,
    density_rows,
    retrieval_step,
    run_record,
)
from moa_vllm.planner.selection import Retrieval, choose
from moa_vllm.planner.stage_cache import StageCache, default_work_dir, file_id, model_id

log = logging.getLogger("moa_vllm.planner")


def start(cfg: SearchConfig) -> stages.SearchRun:
    """The search at its first density (``at_density`` gives the others); logs the
    estimate before any stage runs."""
    import torch
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(cfg.model)
    fp = fingerprint_from_hf_config(hf_config)
    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    dataset = None if cfg.dataset is None else {"path": str(Path(cfg.dataset).resolve()),
                                                "file": file_id(Path(cfg.dataset))}
    data = stages.Data(dataset, cfg.answer_tokens, cfg.seed)
    work = Path(cfg.work_dir) if cfg.work_dir else default_work_dir()
    budgets = len(cfg.densities) if cfg.density == "auto" else 1
    if cfg.density == "auto":
        if cfg.allocated_density is not None:
            raise ValueError("--allocated-density needs a given --density, not auto")
        cfg = replace(cfg, density=sorted(cfg.densities)[0])
    lengths = resolve_lengths(cfg, fp.max_position_embeddings)
    log.info("plan search: %s, density %s, profiling %s, validating %s, work dir %s",
             fp.describe(), cfg.density, lengths.profile, lengths.validate, work)
    log.info(estimate(cfg, hf_config, lengths, budgets).describe(cfg.device, cfg.dtype))
    return stages.SearchRun(cfg, fp, StageCache(work), model_id(cfg.model, cfg.dtype), data,
                            threads, lengths)


def estimate(cfg: SearchConfig, hf_config, lengths: SearchLengths, budgets: int = 1):
    """Peak memory and time of the search (``planner.cost``) at ``budgets`` densities
    (the validation and recall stages repeat at each), before it starts."""
    import torch

    from moa_vllm.planner.cost import DeviceRates, ModelShape, estimate_search
    from moa_vllm.planner.milp import sweep_solves

    dtype = getattr(torch, cfg.dtype)
    return estimate_search(
        ModelShape.from_hf_config(hf_config), lengths.profile, lengths.samples,
        lengths.validate, lengths.validate_samples, budgets * cfg.max_validate + 2,
        cfg.answer_tokens,
        torch.empty(0, dtype=dtype).element_size(), cfg.profile_block,
        budgets * sweep_solves(len(lengths.profile), cfg.pareto_grid), cfg.time_limit,
        DeviceRates.measure(cfg.device, dtype), (2 + budgets) * cfg.retrieval_samples)


def _search_at(run: stages.SearchRun, profiles: dict, profile_info: dict
               ) -> tuple[Plan, Plan, dict]:
    """Stages 3-5 at ``run``'s density: the plan chosen on the validation loss, its
    equal-density uniform window, and the search's record."""
    cfg = run.cfg
    rules, losses = stages.rule_losses(run, profiles, profile_info)
    front, solve_log = stages.pareto_front(run, rules, losses)
    # dense and the equal-density uniform window are scored beside the front
    uniform = uniform_plan(run.fp, cfg.density, grow=True, **asdict(cfg.span_params))
    scores, best, relative = {}, 0, []
    if run.lengths.validate:
        scores = stages.validate(run, uniform, [run.make_plan(rules, c) for c, _ in front])
        best, relative = choose(scores)
        for n, s in scores.items():
            if s.plans[best] >= s.uniform:
                log.warning("the chosen plan does not beat the uniform window at %d tokens "
                            "(%.4f vs %.4f): more calibration samples or profiling lengths "
                            "may help", n, s.plans[best], s.uniform)
    details = density_record(cfg, run.lengths, rules, front, solve_log, scores, best, relative)
    return run.make_plan(rules, front[best][0]), uniform, details


def run_search(cfg: SearchConfig) -> Plan:
    t_start = time.perf_counter()
    run = start(cfg)
    lengths = run.lengths
    profiled = {n: stages.profile(run, n, k) for n, k in zip(lengths.profile, lengths.samples)}
    profiles = {n: imp for n, (imp, _) in profiled.items()}
    profile_info = {n: info for n, (_, info) in profiled.items()}

    budgets = sorted(cfg.densities) if cfg.density == "auto" else [cfg.density]
    dense = stages.retrieval(run, None) if lengths.validate else {}
    baseline = Retrieval.of(dense, dense)
    if cfg.density == "auto" and not baseline.dense:
        raise RuntimeError(
            f"--density auto: dense retrieves none of the {baseline.prompts} recall prompts "
            f"at {lengths.validate} tokens, so retrieval cannot choose a density; give "
            "--density")
    sweep = []
    for density in budgets:
        run = run.at_density(density)
        plan, uniform, details = _search_at(run, profiles, profile_info)
        if not dense:
            break
        sweep.append(retrieval_step(run.cfg, Retrieval.of(stages.retrieval(run, plan), dense)))
        log.info("density %s: recall %d of dense's %d", density, sweep[-1]["solved"],
                 baseline.dense)
        if sweep[-1]["meets_target"]:
            break
    if sweep:  # the equal-density uniform window beside the plan written
        sweep[-1]["uniform_solved"] = Retrieval.of(stages.retrieval(run, uniform), dense).solved
    if sweep and not sweep[-1]["meets_target"]:
        message = (f"no density up to {budgets[-1]} keeps {cfg.retrieval_target} of dense's "
                   f"retrieval (dense: {baseline.dense} of {baseline.prompts} recall prompts "
                   f"at {run.lengths.validate} tokens; the sweep: {sweep})")
        if cfg.density == "auto":
            raise RuntimeError(message + ": add higher --densities, or serve dense")
        log.warning(message)

    total = round(time.perf_counter() - t_start, 2)
    details.update(run_record(cfg, run, baseline, sweep, profile_info, total))
    plan.provenance.details.update(details)
    plan.provenance.details["densities"] = density_rows(plan, run.lengths.density,
                                                        cfg.block_size)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    plan.save(cfg.out)
    log.info("wrote %s at density %s (validation %s) in %.1f s", cfg.out, run.cfg.density,
             details["validation"]["per_length"], total)
    return plan
