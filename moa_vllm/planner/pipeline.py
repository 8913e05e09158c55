"""`moa-vllm plan search`: calibrate -> profile -> rule losses -> MILP sweep -> validate.

Every stage caches its result under the work directory, keyed by a hash of what
it depends on (model fingerprint and weights, data options, length, ...), so an
interrupted run resumes where it stopped and a second density reuses the profile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moa_vllm.plan import (
    PLAN_VERSION,
    Plan,
    Provenance,
    fingerprint_from_hf_config,
    now_iso,
    uniform_plan,
)
from moa_vllm.span_classes import allocated_density, average_density, num_span_classes

log = logging.getLogger("moa_vllm.planner")


@dataclass
class SearchConfig:
    model: str
    density: float
    out: str
    lengths: list[int] = field(default_factory=lambda: [2048, 4096, 8192])
    validate_length: int | None = 12288
    density_lengths: list[int] | None = None
    allocated_density: float | None = None
    elastic: str = "prompt"
    max_span_classes: int = 4
    block_size: int = 16
    sink_tokens: int = 64
    min_window: int = 64
    profile_block: int = 64
    samples: list[int] | None = None
    validate_samples: int = 2
    answer_tokens: int = 64
    dataset: str | None = None
    seed: int = 0
    rules: str | None = None
    max_rules_per_layer: int = 2
    pareto_grid: int = 2
    max_validate: int = 6
    time_limit: float = 30.0
    mip_rel_gap: float = 5e-3
    threads: int | None = None
    work_dir: str | None = None
    progress: bool = True


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_id(model_dir: str) -> dict:
    d = Path(model_dir)
    files = {}
    for f in sorted(d.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".bin"):
            st = f.stat()
            files[f.name] = [st.st_size, int(st.st_mtime)]
    return {"path": str(d.resolve()), "files": files}


class Stage:
    def __init__(self, times: dict, name: str):
        self.times, self.name = times, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        self.times[self.name] = round(self.times.get(self.name, 0.0) + dt, 2)
        if exc[0] is None:
            log.info("stage %s: %.1f s", self.name, dt)


def default_samples(length: int) -> int:
    """About 16k tokens per profiling length (at least one sample)."""
    return max(1, 16384 // length)


def run_search(cfg: SearchConfig) -> Plan:
    import torch
    from transformers import AutoConfig

    from moa_vllm.planner import data as D
    from moa_vllm.planner import profile as P
    from moa_vllm.planner.milp import Assigner, Problem, cost_tables, pareto_sweep
    from moa_vllm.planner.rules import Rule, default_rules, parse_rules, rule_losses

    t_start = time.perf_counter()
    times: dict[str, float] = {}
    cached_times: dict[str, float] = {}  # stages reused from the cache: their original time
    fp = fingerprint_from_hf_config(AutoConfig.from_pretrained(cfg.model))
    lengths = sorted(cfg.lengths)
    samples = cfg.samples or [default_samples(n) for n in lengths]
    if len(samples) != len(lengths):
        raise ValueError("--samples needs one count per profiling length")
    work = Path(cfg.work_dir or os.environ.get("MOA_PLAN_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moa-vllm" / "plan-search")
    work.mkdir(parents=True, exist_ok=True)
    model_key = _model_id(cfg.model)
    data_key = {
        "dataset": None if cfg.dataset is None else _model_id_file(cfg.dataset),
        "answer_tokens": cfg.answer_tokens, "seed": cfg.seed, "data_version": 2,
    }
    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    log.info("plan search: %s, density %s, lengths %s, work dir %s", fp.describe(),
             cfg.density, lengths, work)

    model = tok = None

    def get_model():
        nonlocal model, tok
        if model is None:
            with Stage(times, "load_model"):
                model, tok = P.load_model(cfg.model, threads)
        return model, tok

    def samples_for(length: int, n: int, split: str) -> list[D.Sample]:
        key = _hash({"model": model_key, "data": data_key, "length": length, "n": n, "split": split})
        path = work / f"data-{split}-{length}-{key}.json"
        stage = f"calibration_{split}_{length}"
        if path.is_file():
            meta = path.with_suffix(".seconds")
            if meta.is_file():
                cached_times[stage] = float(meta.read_text())
            return [D.Sample.from_json(d) for d in json.loads(path.read_text())]
        m, t = get_model()
        seed = cfg.seed if split == "calib" else cfg.seed + 1000003
        with Stage(times, stage):
            out = D.build_samples(m, t, length, n, cfg.answer_tokens, seed, cfg.dataset, cfg.progress)
        path.write_text(json.dumps([s.to_json() for s in out]))
        path.with_suffix(".seconds").write_text(str(times[stage]))
        return out

    # 1-2. calibration data and profiles
    profiles, profile_info = {}, {}
    for length, n in zip(lengths, samples):
        data = samples_for(length, n, "calib")
        key = _hash({"model": model_key, "data": data_key, "length": length, "n": n,
                     "block": cfg.profile_block, "profile_version": 1})
        path = work / f"profile-{length}-{key}.npz"
        if path.is_file():
            z = np.load(path, allow_pickle=False)
            profiles[length] = z["importance"]
            profile_info[length] = json.loads(str(z["info"]))
            if "seconds" in profile_info[length]:
                cached_times[f"profile_{length}"] = profile_info[length]["seconds"]
            log.info("profile %d: cached (%s)", length, path.name)
            continue
        m, _ = get_model()
        with Stage(times, f"profile_{length}"):
            imp, info = P.profile_length(m, data, length, cfg.profile_block, cfg.progress)
        info["seconds"] = times[f"profile_{length}"]
        np.savez(path, importance=imp, info=json.dumps(info))
        profiles[length], profile_info[length] = imp, info

    # 3. search space
    with Stage(times, "rule_losses"):
        rules = parse_rules(cfg.rules) if cfg.rules else default_rules(
            fp.max_position_embeddings, cfg.min_window, cfg.sink_tokens, cfg.density)
        losses = np.stack([
            rule_losses(profiles[n], rules, n, cfg.profile_block, cfg.sink_tokens, cfg.min_window,
                        cfg.elastic, int(round(profile_info[n]["mean_prompt_len"])))
            for n in lengths
        ])
        dl = sorted(set(cfg.density_lengths or (lengths + [x for x in (cfg.validate_length, fp.max_position_embeddings) if x])))
        dens, held, dense, keys = cost_tables(rules, dl, cfg.sink_tokens, cfg.min_window, cfg.elastic,
                                              cfg.block_size, fp.max_position_embeddings)
    alloc_budget = cfg.allocated_density if cfg.allocated_density is not None else cfg.density
    prob = Problem(losses, dens, held, dense, keys, cfg.density, alloc_budget,
                   cfg.max_rules_per_layer, cfg.max_span_classes)

    def make_plan(choice, details=None) -> Plan:
        return Plan(
            version=PLAN_VERSION, model=fp, sink_tokens=cfg.sink_tokens, elastic=cfg.elastic,
            min_window=cfg.min_window, max_span_classes=cfg.max_span_classes,
            rules=[[rules[int(r)].as_tuple() for r in row] for row in choice],
            provenance=Provenance(method="moa-search", created=now_iso(), details=details or {}),
        )

    def densities(plan: Plan) -> list[dict]:
        return [{"length": n, "average": round(average_density(plan, n), 5),
                 "allocated": round(allocated_density(plan, n, cfg.block_size), 5)} for n in dl]

    def verify(choice) -> bool:
        plan = make_plan(choice)
        return all(d["average"] <= cfg.density + 1e-9 and d["allocated"] <= alloc_budget + 1e-9
                   for d in _exact_densities(plan, dl, cfg.block_size))

    # 4. optimisation
    search_key = _hash({"losses": _hash(losses.round(12).tolist()), "dl": dl, "density": cfg.density,
                        "alloc": alloc_budget, "R": cfg.max_rules_per_layer, "K": cfg.max_span_classes,
                        "grid": cfg.pareto_grid, "tl": cfg.time_limit, "gap": cfg.mip_rel_gap,
                        "rules": [r.as_tuple() for r in rules], "elastic": cfg.elastic,
                        "sink": cfg.sink_tokens, "minw": cfg.min_window, "bs": cfg.block_size})
    path = work / f"pareto-{search_key}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        front = [(np.array(c["choice"]), np.array(c["objectives"])) for c in cached["front"]]
        solve_log = cached["log"]
        log.info("MILP sweep: cached (%s)", path.name)
    else:
        with Stage(times, "milp"):
            assigner = Assigner(prob, verify, cfg.time_limit, cfg.mip_rel_gap)
            sols, solve_log = pareto_sweep(assigner, cfg.pareto_grid, cfg.progress)
        if not sols:
            raise RuntimeError("no feasible plan: relax --density, --max-span-classes or the rule grid")
        front = [(s.choice, s.objectives) for s in sols]
        path.write_text(json.dumps({"front": [{"choice": c.tolist(), "objectives": o.tolist()}
                                              for c, o in front], "log": solve_log}))
    log.info("MILP: %d solves, %.1f s solver time, %d Pareto plans",
             len(solve_log), sum(e["seconds"] for e in solve_log), len(front))

    # 5. validation
    if len(front) > cfg.max_validate:
        # keep an even spread over the front (sorted by the longest length's loss)
        idx = np.unique(np.linspace(0, len(front) - 1, cfg.max_validate).round().astype(int))
        front = [front[i] for i in idx]
    scores = []
    if cfg.validate_length and cfg.validate_samples:
        vdata = samples_for(cfg.validate_length, cfg.validate_samples, "valid")
        vkey = _hash({"model": model_key, "data": data_key, "length": cfg.validate_length,
                      "n": cfg.validate_samples})
        vpath = work / f"validate-{vkey}.json"
        vcache = json.loads(vpath.read_text()) if vpath.is_file() else {}
        from tqdm import tqdm

        # dense and the equal-density uniform window are scored beside the front
        uniform = uniform_plan(fp, cfg.density, sink_tokens=cfg.sink_tokens, elastic=cfg.elastic,
                               min_window=cfg.min_window, grow=True)
        with Stage(times, "validation"):
            todo = [None, uniform] + [make_plan(c) for c, _ in front]
            for plan in tqdm(todo, desc=f"validate {cfg.validate_length}", disable=not cfg.progress, leave=False):
                k = "dense" if plan is None else _hash([plan.rules, plan.sink_tokens, plan.elastic, plan.min_window])
                if k not in vcache:
                    m, _ = get_model()
                    vcache[k] = float(np.mean([P.masked_answer_loss(m, plan, s.ids, len(s.prompt)) for s in vdata]))
                    vpath.write_text(json.dumps(vcache))
                scores.append(vcache[k])
        dense_loss, uniform_loss, scores = scores[0], scores[1], scores[2:]
        best = int(np.argmin(scores))
        if scores[best] >= uniform_loss:
            log.warning("no searched plan beats the uniform window at %d tokens (%.4f vs %.4f): "
                        "more calibration samples or profiling lengths may help",
                        cfg.validate_length, scores[best], uniform_loss)
    else:
        dense_loss = uniform_loss = None
        best = 0
    choice, objectives = front[best]

    total = round(time.perf_counter() - t_start, 2)
    details = {
        "density": cfg.density,
        "allocated_density_budget": alloc_budget,
        "density_lengths": dl,
        "block_size": cfg.block_size,
        "profile_lengths": lengths,
        "profile_block": cfg.profile_block,
        "samples_per_length": dict(zip(map(str, lengths), samples)),
        "profiles": {str(n): profile_info[n] for n in lengths},
        "data": {"source": cfg.dataset or "synthetic (pydoc_data.topics): facts, passages, topics",
                 "targets": "dense model greedy answers" if not cfg.dataset else "dataset answers or dense greedy",
                 "answer_tokens": cfg.answer_tokens, "seed": cfg.seed},
        "rules_grid": [r.as_tuple() for r in rules],
        "max_rules_per_layer": cfg.max_rules_per_layer,
        "span_classes": num_span_classes(fp.num_layers, cfg.max_span_classes),
        "solver": {"name": "scipy.optimize.milp (HiGHS)", "time_limit_s": cfg.time_limit,
                   "mip_rel_gap": cfg.mip_rel_gap, "pareto_grid": cfg.pareto_grid,
                   "solves": solve_log,
                   "total_solver_s": round(sum(e["seconds"] for e in solve_log), 2)},
        "pareto": [{"objectives": [round(float(x), 6) for x in o],
                    "validation_loss": None if not scores else round(scores[i], 6)}
                   for i, (_, o) in enumerate(front)],
        "validation": {"length": cfg.validate_length, "samples": cfg.validate_samples,
                       "dense_loss": dense_loss, "uniform_loss": uniform_loss, "chosen": best,
                       "chosen_loss": scores[best] if scores else None},
        "stage_seconds": times,
        "cached_stage_seconds": cached_times,
        "total_seconds": total,
        "threads": threads,
        "machine": f"{os.cpu_count()} CPUs",
    }
    plan = make_plan(choice, details)
    plan.provenance.details["densities"] = densities(plan)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    plan.save(cfg.out)
    log.info("wrote %s (validation loss %s, uniform window %s, dense %s) in %.1f s", cfg.out,
             scores[best] if scores else None, uniform_loss, dense_loss, total)
    return plan


def _exact_densities(plan: Plan, lengths, block_size) -> list[dict]:
    return [{"average": average_density(plan, n), "allocated": allocated_density(plan, n, block_size)}
            for n in lengths]


def _model_id_file(path: str) -> dict:
    st = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime": int(st.st_mtime)}


def config_dict(cfg: SearchConfig) -> dict:
    return asdict(cfg)
