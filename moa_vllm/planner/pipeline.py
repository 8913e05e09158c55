"""`moa-vllm plan search`: calibrate -> profile -> rule losses -> MILP sweep -> validate.

Every stage caches its result in one ``StageCache`` under the work directory,
keyed by a hash of what it depends on (model fingerprint and weights, data
options, length, ...), so an interrupted run resumes where it stopped and a
second density reuses the profile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moa_vllm import envs
from moa_vllm.plan import (
    PLAN_VERSION,
    ModelFingerprint,
    Plan,
    Provenance,
    fingerprint_from_hf_config,
    now_iso,
    uniform_plan,
)
from moa_vllm.plan_report import density_table
from moa_vllm.span_classes import num_span_classes

log = logging.getLogger("moa_vllm.planner")


def _opt(default, help: str, **cli):
    """A ``SearchConfig`` field with its command-line help (``planner.cli`` reads it);
    ``dataclasses.MISSING``: a required option."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class SearchConfig:
    """Every option of ``moa-vllm plan search`` (the command line is derived from it)."""

    model: str = _opt(MISSING, "HF model directory")
    density: float = _opt(MISSING, "KV density budget (average and allocated) at every "
                          "length of interest")
    out: str = _opt(MISSING, "where to write the plan")
    lengths: list[int] = _opt([2048, 4096, 8192], "profiling lengths")
    validate_length: int | None = _opt(12288, "unseen validation length (0: none)",
                                       type=lambda s: int(s) or None)
    density_lengths: list[int] | None = _opt(
        None, "lengths the densities are constrained at (default: profiling lengths, "
        "validation length and max_position_embeddings)")
    allocated_density: float | None = _opt(
        None, "budget of the runtime's allocated density, the KV blocks vLLM holds "
        "(default: --density; 1.0 frees each KV head from its layer class: per-head plans "
        "that keep retrieval heads wide)")
    elastic: str = _opt("prompt", "prompt: N = prompt length, every prompt query keeps the "
                        "whole span (better accuracy at equal density; prefix caching off); "
                        "position: N = t + 1 (prefix caching stays on)",
                        choices=["position", "prompt"])
    max_span_classes: int = _opt(4, "span classes (KV-cache groups) at most")
    block_size: int = _opt(16, "runtime KV block size")
    sink_tokens: int = _opt(64, "sink tokens every head keeps")
    min_window: int = _opt(64, "smallest window of any rule")
    profile_block: int = _opt(64, "importance tile size")
    samples: list[int] | None = _opt(None, "calibration samples per profiling length "
                                     "(default: about 16k tokens per length)")
    validate_samples: int = _opt(2, "validation samples")
    answer_tokens: int = _opt(64, "dense answer tokens (targets)")
    dataset: str | None = _opt(None, 'JSONL of {"prompt","answer"}, {"prompt"} or {"text"}')
    seed: int = _opt(0, "calibration seed")
    rules: str | None = _opt(None, 'rule grid "alpha:beta,..." (default: ~48 rules scaled '
                             "to the context)")
    max_rules_per_layer: int = _opt(2, "distinct rules per layer at most")
    pareto_grid: int = _opt(2, "epsilon levels per secondary length")
    max_validate: int = _opt(6, "Pareto plans scored at the validation length")
    time_limit: float = _opt(30.0, "seconds per MILP solve")
    mip_rel_gap: float = _opt(5e-3, "relative MIP gap", flag="--mip-gap")
    threads: int | None = _opt(None, "torch threads")
    work_dir: str | None = _opt(None, "stage cache (default: $MOA_PLAN_CACHE, else "
                                "~/.cache/moa-vllm/plan-search)")
    progress: bool = _opt(True, "progress bars", flag="--no-progress")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_id(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, int(st.st_mtime)]


def _model_id(model_dir: str) -> dict:
    d = Path(model_dir)
    files = {f.name: _file_id(f) for f in sorted(d.iterdir())
             if f.is_file() and f.suffix in (".json", ".safetensors", ".bin")}
    return {"path": str(d.resolve()), "files": files}


def default_samples(length: int) -> int:
    """About 16k tokens per profiling length (at least one sample)."""
    return max(1, 16384 // length)


def default_work_dir() -> Path:
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(envs.get(envs.MOA_PLAN_CACHE) or xdg / "moa-vllm" / "plan-search")


class StageCache:
    """The one cache of every stage: ``get(stage, key, compute)`` returns the stored
    result for ``key`` or computes, times and stores it. A result is a JSON value
    and a dict of arrays (one ``.npz`` file each)."""

    def __init__(self, work: Path) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.seconds: dict[str, float] = {}  # stages computed in this run
        self.cached_seconds: dict[str, float] = {}  # stages reused: their original time

    @contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + dt, 2)
        log.info("stage %s: %.1f s", stage, dt)

    def get(self, stage: str, key: dict,
            compute: Callable[[], tuple[Any, dict[str, np.ndarray]]]
            ) -> tuple[Any, dict[str, np.ndarray]]:
        path = self.work / f"{stage}-{_hash(key)}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["__meta__"]))
                arrays = {k: z[k] for k in z.files if k != "__meta__"}
            self.cached_seconds[stage] = round(
                self.cached_seconds.get(stage, 0.0) + meta["seconds"], 2)
            return meta["value"], arrays
        t0 = time.perf_counter()
        with self.timed(stage):
            value, arrays = compute()
        meta = {"value": value, "seconds": round(time.perf_counter() - t0, 2)}
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, __meta__=json.dumps(meta), **arrays)
        os.replace(tmp, path)
        return value, arrays


@dataclass
class _Run:
    """What every stage of one search reads."""

    cfg: SearchConfig
    fp: ModelFingerprint
    cache: StageCache
    model_key: dict
    data_key: dict
    threads: int
    _model: Any = None

    def model(self):
        """The HF model and tokenizer, loaded on the first stage that needs them."""
        if self._model is None:
            from moa_vllm.planner import profile as P

            with self.cache.timed("load_model"):
                self._model = P.load_model(self.cfg.model, self.threads)
        return self._model

    def make_plan(self, rules, choice, details: dict | None = None) -> Plan:
        cfg = self.cfg
        return Plan(
            version=PLAN_VERSION, model=self.fp, sink_tokens=cfg.sink_tokens,
            elastic=cfg.elastic, min_window=cfg.min_window,
            max_span_classes=cfg.max_span_classes,
            rules=[[rules[int(r)].as_tuple() for r in row] for row in choice],
            provenance=Provenance(method="moa-search", created=now_iso(), details=details or {}),
        )


def _start(cfg: SearchConfig) -> _Run:
    import torch
    from transformers import AutoConfig

    fp = fingerprint_from_hf_config(AutoConfig.from_pretrained(cfg.model))
    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    dataset = None if cfg.dataset is None else {"path": str(Path(cfg.dataset).resolve()),
                                                "file": _file_id(Path(cfg.dataset))}
    data_key = {"dataset": dataset, "answer_tokens": cfg.answer_tokens, "seed": cfg.seed,
                "data_version": 2}
    work = Path(cfg.work_dir) if cfg.work_dir else default_work_dir()
    log.info("plan search: %s, density %s, lengths %s, work dir %s", fp.describe(),
             cfg.density, sorted(cfg.lengths), work)
    return _Run(cfg, fp, StageCache(work), _model_id(cfg.model), data_key, threads)


def _calibration(run: _Run, length: int, n: int, split: str) -> list:
    """Stage 1: prompts with the dense model's answers (``split``: calib or valid)."""
    from moa_vllm.planner import data as D

    def compute():
        model, tok = run.model()
        seed = run.cfg.seed if split == "calib" else run.cfg.seed + 1000003
        out = D.build_samples(model, tok, length, n, run.cfg.answer_tokens, seed,
                              run.cfg.dataset, run.cfg.progress)
        return [s.to_json() for s in out], {}

    key = {"model": run.model_key, "data": run.data_key, "length": length, "n": n,
           "split": split}
    value, _ = run.cache.get(f"calibration_{split}_{length}", key, compute)
    return [D.Sample.from_json(d) for d in value]


def _profile(run: _Run, length: int, n: int) -> tuple[np.ndarray, dict]:
    """Stage 2: each head's mean influence on the answer loss, per key tile."""
    from moa_vllm.planner import profile as P

    data = _calibration(run, length, n, "calib")

    def compute():
        model, _ = run.model()
        importance, info = P.profile_length(model, data, length, run.cfg.profile_block,
                                            run.cfg.progress)
        return info, {"importance": importance}

    key = {"model": run.model_key, "data": run.data_key, "length": length, "n": n,
           "block": run.cfg.profile_block, "profile_version": 1}
    info, arrays = run.cache.get(f"profile_{length}", key, compute)
    return arrays["importance"], info


def _density_lengths(cfg: SearchConfig, fp: ModelFingerprint) -> list[int]:
    extra = [x for x in (cfg.validate_length, fp.max_position_embeddings) if x]
    return sorted(set(cfg.density_lengths or (sorted(cfg.lengths) + extra)))


def _problem(run: _Run, profiles: dict, profile_info: dict):
    """Stage 3: the rule grid, each rule's loss per head and length, and the cost
    tables of the MILP."""
    from moa_vllm.planner.milp import Problem, cost_tables
    from moa_vllm.planner.rules import default_rules, parse_rules, rule_losses

    cfg, fp = run.cfg, run.fp
    with run.cache.timed("rule_losses"):
        rules = parse_rules(cfg.rules) if cfg.rules else default_rules(
            fp.max_position_embeddings, cfg.min_window, cfg.sink_tokens, cfg.density)
        losses = np.stack([
            rule_losses(profiles[n], rules, n, cfg.profile_block, cfg.sink_tokens,
                        cfg.min_window, cfg.elastic,
                        int(round(profile_info[n]["mean_prompt_len"])))
            for n in sorted(profiles)
        ])
        dens, held, dense, keys = cost_tables(
            rules, _density_lengths(cfg, fp), cfg.sink_tokens, cfg.min_window, cfg.elastic,
            cfg.block_size, fp.max_position_embeddings)
    prob = Problem(losses, dens, held, dense, keys, cfg.density, _alloc_budget(cfg),
                   cfg.max_rules_per_layer, cfg.max_span_classes)
    return rules, losses, prob


def _alloc_budget(cfg: SearchConfig) -> float:
    return cfg.allocated_density if cfg.allocated_density is not None else cfg.density


def _pareto_front(run: _Run, rules, losses, prob) -> tuple[list, list]:
    """Stage 4: the epsilon-constraint sweep; every solution is checked with the
    runtime's own density functions."""
    from moa_vllm.planner.milp import Assigner, pareto_sweep

    cfg = run.cfg
    lengths = _density_lengths(cfg, run.fp)

    def verify(choice) -> bool:
        table = density_table(run.make_plan(rules, choice), lengths, cfg.block_size)
        return all(d.average_density <= cfg.density + 1e-9
                   and d.allocated_density <= _alloc_budget(cfg) + 1e-9 for d in table)

    def compute():
        assigner = Assigner(prob, verify, cfg.time_limit, cfg.mip_rel_gap)
        sols, solve_log = pareto_sweep(assigner, cfg.pareto_grid, cfg.progress)
        if not sols:
            raise RuntimeError("no feasible plan: relax --density, --max-span-classes or "
                               "the rule grid")
        return {"objectives": [s.objectives.tolist() for s in sols], "log": solve_log}, \
            {"choices": np.stack([s.choice for s in sols])}

    key = {"losses": _hash(losses.round(12).tolist()), "dl": lengths, "density": cfg.density,
           "alloc": _alloc_budget(cfg), "R": cfg.max_rules_per_layer,
           "K": cfg.max_span_classes, "grid": cfg.pareto_grid, "tl": cfg.time_limit,
           "gap": cfg.mip_rel_gap, "rules": [r.as_tuple() for r in rules],
           "elastic": cfg.elastic, "sink": cfg.sink_tokens, "minw": cfg.min_window,
           "bs": cfg.block_size}
    value, arrays = run.cache.get("milp", key, compute)
    front = list(zip(arrays["choices"], map(np.array, value["objectives"])))
    solve_log = value["log"]
    log.info("MILP: %d solves, %.1f s solver time, %d Pareto plans", len(solve_log),
             sum(e["seconds"] for e in solve_log), len(front))
    if len(front) > cfg.max_validate:
        # keep an even spread over the front (sorted by the longest length's loss)
        idx = np.unique(np.linspace(0, len(front) - 1, cfg.max_validate).round().astype(int))
        front = [front[i] for i in idx]
    return front, solve_log


def _validate(run: _Run, plans: list[Plan | None]) -> list[float]:
    """Stage 5: the answer loss of each plan (None: dense) at the unseen length."""
    from tqdm import tqdm

    from moa_vllm.planner import profile as P

    cfg = run.cfg
    vdata = _calibration(run, cfg.validate_length, cfg.validate_samples, "valid")
    data_key = {"model": run.model_key, "data": run.data_key, "length": cfg.validate_length,
                "n": cfg.validate_samples}
    scores = []
    for plan in tqdm(plans, desc=f"validate {cfg.validate_length}",
                     disable=not cfg.progress, leave=False):
        spans = None if plan is None else [plan.rules, plan.sink_tokens, plan.elastic,
                                           plan.min_window]

        def compute(plan=plan):
            model, _ = run.model()
            return float(np.mean([P.masked_answer_loss(model, plan, s.ids, len(s.prompt))
                                  for s in vdata])), {}

        loss, _ = run.cache.get("validation", {"data": data_key, "plan": spans}, compute)
        scores.append(loss)
    return scores


def run_search(cfg: SearchConfig) -> Plan:
    t_start = time.perf_counter()
    run = _start(cfg)
    lengths = sorted(cfg.lengths)
    samples = cfg.samples or [default_samples(n) for n in lengths]
    if len(samples) != len(lengths):
        raise ValueError("--samples needs one count per profiling length")
    profiled = {n: _profile(run, n, k) for n, k in zip(lengths, samples)}
    profiles = {n: imp for n, (imp, _) in profiled.items()}
    profile_info = {n: info for n, (_, info) in profiled.items()}
    rules, losses, prob = _problem(run, profiles, profile_info)
    front, solve_log = _pareto_front(run, rules, losses, prob)

    scores, dense_loss, uniform_loss, best = [], None, None, 0
    if cfg.validate_length and cfg.validate_samples:
        # dense and the equal-density uniform window are scored beside the front
        uniform = uniform_plan(run.fp, cfg.density, sink_tokens=cfg.sink_tokens,
                               elastic=cfg.elastic, min_window=cfg.min_window, grow=True)
        dense_loss, uniform_loss, *scores = _validate(
            run, [None, uniform] + [run.make_plan(rules, c) for c, _ in front])
        best = int(np.argmin(scores))
        if scores[best] >= uniform_loss:
            log.warning("no searched plan beats the uniform window at %d tokens (%.4f vs %.4f): "
                        "more calibration samples or profiling lengths may help",
                        cfg.validate_length, scores[best], uniform_loss)
    choice, _ = front[best]

    total = round(time.perf_counter() - t_start, 2)
    dl = _density_lengths(cfg, run.fp)
    details = {
        "density": cfg.density,
        "allocated_density_budget": _alloc_budget(cfg),
        "density_lengths": dl,
        "block_size": cfg.block_size,
        "profile_lengths": lengths,
        "profile_block": cfg.profile_block,
        "samples_per_length": dict(zip(map(str, lengths), samples)),
        "profiles": {str(n): profile_info[n] for n in lengths},
        "data": {"source": cfg.dataset or "synthetic (pydoc_data.topics): facts, passages, topics",
                 "targets": "dense model greedy answers" if not cfg.dataset
                 else "dataset answers or dense greedy",
                 "answer_tokens": cfg.answer_tokens, "seed": cfg.seed},
        "rules_grid": [r.as_tuple() for r in rules],
        "max_rules_per_layer": cfg.max_rules_per_layer,
        "span_classes": num_span_classes(run.fp.num_layers, cfg.max_span_classes),
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
        "stage_seconds": run.cache.seconds,
        "cached_stage_seconds": run.cache.cached_seconds,
        "total_seconds": total,
        "threads": run.threads,
        "machine": f"{os.cpu_count()} CPUs",
    }
    plan = run.make_plan(rules, choice, details)
    plan.provenance.details["densities"] = [
        {"length": d.length, "average": round(d.average_density, 5),
         "allocated": round(d.allocated_density, 5)}
        for d in density_table(plan, dl, cfg.block_size)]
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    plan.save(cfg.out)
    log.info("wrote %s (validation loss %s, uniform window %s, dense %s) in %.1f s", cfg.out,
             scores[best] if scores else None, uniform_loss, dense_loss, total)
    return plan
