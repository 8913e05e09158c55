"""`moa-vllm plan search`: calibrate -> profile -> rule losses -> MILP sweep -> validate
(answer loss, then retrieval). ``--density auto`` repeats the last three stages at
rising budgets and keeps the lowest whose plan still retrieves what dense does.

Every stage caches its result in one ``StageCache`` under the work directory,
keyed by a hash of what it depends on (model fingerprint and weights, data
options, length, ...), so an interrupted run resumes where it stopped and a
second density reuses the profile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, field, replace
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
    full_layer_rows,
    now_iso,
    uniform_plan,
)
from moa_vllm.plan_report import density_table
from moa_vllm.span_classes import num_span_classes, objective_lengths, single_rule_classes

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
    out: str = _opt(MISSING, "where to write the plan")
    density: float | str = _opt(
        "auto", "KV density budget (average and allocated) at every length of interest; "
        "auto: the lowest of --densities whose plan retrieves at least "
        "--retrieval-target of what dense retrieves on the validation lengths",
        type=lambda text: text if text == "auto" else float(text))
    densities: list[float] = _opt([0.25, 0.375, 0.5, 0.625, 0.75, 0.875],
                                  "budgets --density auto tries, lowest first")
    retrieval_target: float = _opt(0.95, "fraction of dense's retrieval a plan must keep "
                                   "(--density auto chooses by it; a fixed density warns)")
    retrieval_samples: int = _opt(8, "recall prompts per validation length (facts in "
                                  "natural text at evenly spread depths)")
    exact_floor: int = _opt(1024, "prompts up to this many tokens stay exact (every head "
                            "reads every key): they hold little KV, and most requests are "
                            "short; budgets and losses start above it (0: no floor)")
    lengths: list[int] | None = _opt(
        None, "profiling lengths, each one loss the Pareto sweep trades (default: the exact "
        "floor, where it stops binding, then 512 doubling above it up to half the context, "
        "at most 16384: the shortest windowed prompts are most requests)")
    validate_lengths: list[int] | None = _opt(
        None, "unseen validation lengths the plan is chosen on (default: 3/4 and 3/2 of the "
        "shortest and 3/2 of the longest profiled length within the context; empty: no "
        "validation)")
    density_lengths: list[int] | None = _opt(
        None, "lengths the densities are constrained at (default: profiling and validation "
        "lengths, and 512 up to the context at powers of two and halfway between, above "
        "the exact floor and from where sinks + min_window are at most half the budget)")
    budget_slack: float = _opt(
        0.05, "every length of interest spends at least the density budget minus this, so "
        "no head class gives up its span at short prompts to save budget nobody uses "
        "(1: the budget is a ceiling only)")
    allocated_density: float | None = _opt(
        None, "budget of the runtime's allocated density, the KV blocks vLLM holds "
        "(default: --density; head classes of one rule each hold the average density)")
    elastic: str = _opt("prompt", "prompt: N = prompt length, every prompt query keeps the "
                        "whole span (better accuracy at equal density; prefix caching off); "
                        "position: N = t + 1 (prefix caching stays on)",
                        choices=["position", "prompt"])
    max_span_classes: int = _opt(9, "head classes (KV-cache groups) at most, one rule each: "
                                 "the plan has this many distinct rules")
    block_size: int = _opt(16, "runtime KV block size")
    sink_tokens: int = _opt(64, "sink tokens every head keeps")
    min_window: int = _opt(64, "smallest window of any rule")
    granule: int = _opt(64, "window starts rounded down to multiples of this many tokens "
                        "(a multiple of the KV block size: CPU decode runs on vLLM's own "
                        "op over whole blocks; 1: token-exact)")
    profile_block: int = _opt(64, "importance tile size")
    samples: list[int] | None = _opt(None, "calibration samples per profiling length "
                                     "(default: about 16k tokens per length)")
    validate_samples: list[int] | None = _opt(
        None, "validation samples per validation length (default: about 8k tokens, at "
        "least 2)")
    answer_tokens: int = _opt(64, "dense answer tokens (targets)")
    dataset: str | None = _opt(None, 'JSONL of {"prompt","answer"}, {"prompt"} or {"text"}')
    seed: int = _opt(0, "calibration seed")
    rules: str | None = _opt(None, 'rule grid "alpha:beta,..." (default: ~48 rules scaled '
                             "to the context)")
    pareto_grid: int = _opt(2, "epsilon levels per secondary length")
    max_validate: int = _opt(6, "Pareto plans scored at the validation length")
    time_limit: float = _opt(30.0, "seconds per MILP solve")
    mip_rel_gap: float = _opt(5e-3, "relative MIP gap", flag="--mip-gap")
    threads: int | None = _opt(None, "torch threads")
    device: str = _opt("cpu", "where the model runs (cuda, cuda:1, ...): with --dtype "
                       "bfloat16 an 8B model's search fits one 80 GB GPU")
    dtype: str = _opt("float32", "the model's weights and activations (attention effects "
                      "are computed in fp32 either way)",
                      choices=["float32", "bfloat16", "float16"])
    work_dir: str | None = _opt(None, "stage cache (default: $MOA_PLAN_CACHE, else "
                                "~/.cache/moa-vllm/plan-search)")
    progress: bool = _opt(True, "progress bars", flag="--no-progress")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_id(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, int(st.st_mtime)]


def _model_id(model_dir: str, dtype: str) -> dict:
    """What every stage's result depends on about the model: its files, and the
    dtype it runs in unless the default fp32 (so fp32 caches stay valid)."""
    d = Path(model_dir)
    files = {f.name: _file_id(f) for f in sorted(d.iterdir())
             if f.is_file() and f.suffix in (".json", ".safetensors", ".bin")}
    key = {"path": str(d.resolve()), "files": files}
    return key if dtype == "float32" else {**key, "dtype": dtype}


def default_samples(length: int) -> int:
    """About 16k tokens per profiling length (at least one sample)."""
    return max(1, 16384 // length)


@dataclass(frozen=True)
class SearchLengths:
    """The lengths one search works at (``resolve_lengths``)."""

    profile: list[int]  # one loss each (the Pareto sweep's objectives)
    samples: list[int]
    validate: list[int]  # unseen: one shorter and one longer than the profiled ones
    validate_samples: list[int]
    density: list[int]  # where the density budgets hold


def resolve_lengths(cfg: SearchConfig, context: int) -> SearchLengths:
    """Defaults span the windowed prompts a server sees (those above the exact floor):
    profiling from the floor, where it stops binding (512 without one: SmolLM2 rules
    searched with a profile at 1024 kept a sixth of the excess loss at 1152 tokens
    that rules searched from 3/2 of the floor kept, docs/plan-search.md); validation
    just past the
    floor (else below the shortest profile), between the two shortest (most requests
    are short) and beyond the longest; budgets from ``budget_start`` up to the
    context. Nothing is validated or budgeted at or below the floor: the plan is
    exact there."""
    floor = cfg.exact_floor
    doublings = [n for n in _doublings(512, min(context // 2, 16384)) if n > floor]
    profile = sorted(cfg.lengths or ({floor} if floor else set()) | set(doublings))
    validate = sorted(cfg.validate_lengths if cfg.validate_lengths is not None else
                      {max(profile[0] * 3 // 4, floor * 9 // 8), profile[0] * 3 // 2,
                       min(context, profile[-1] * 3 // 2)} - set(profile))
    if profile[0] < floor or min(validate, default=floor + 1) <= floor:
        raise ValueError(f"profiling lengths must be at least the exact floor ({floor}) and "
                         f"validation lengths above it: the plan is exact below; got "
                         f"{min(profile + validate)}")
    samples = cfg.samples or [default_samples(n) for n in profile]
    vsamples = cfg.validate_samples or [max(2, 8192 // n) for n in validate]
    if len(samples) != len(profile) or len(vsamples) != len(validate):
        raise ValueError("--samples and --validate-samples need one count per length")
    start = budget_start(cfg.density, cfg.sink_tokens, cfg.min_window)
    density = sorted(set(cfg.density_lengths or
                         [n for n in profile + validate + [start] + objective_lengths(context)
                          if max(start, floor + 1) <= n <= context]))
    return SearchLengths(profile, samples, validate, vsamples, density)


def budget_start(density: float, sink_tokens: int, min_window: int) -> int:
    """Shortest length the default budgets hold at: where sinks + ``min_window`` are
    at most half the budget. Shorter, a budget forces every head to that floor, so
    no plan can differ from the uniform window at short prompts (a 0.5 budget at
    256 tokens did exactly that). A request shorter than this holds no more than
    one of this length does (held blocks grow with the length under every rule)."""
    return math.ceil(2 * (sink_tokens + min_window) / density)


def _doublings(start: int, stop: int) -> list[int]:
    out = [start]
    while out[-1] * 2 <= stop:
        out.append(out[-1] * 2)
    return out


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
    """What every stage of one search at one density reads."""

    cfg: SearchConfig  # its density a number
    fp: ModelFingerprint
    cache: StageCache
    model_key: dict
    data_key: dict
    threads: int
    lengths: SearchLengths
    _loaded: dict = field(default_factory=dict)  # shared by every density's run

    def model(self):
        """The HF model and tokenizer, loaded on the first stage that needs them."""
        if not self._loaded:
            from moa_vllm.planner import profile as P

            with self.cache.timed("load_model"):
                self._loaded["model"] = P.load_model(self.cfg.model, self.threads,
                                                     self.cfg.device, self.cfg.dtype)
        return self._loaded["model"]

    def at_density(self, density: float) -> _Run:
        """The same search at another budget (the density lengths follow it)."""
        cfg = replace(self.cfg, density=density)
        return replace(self, cfg=cfg,
                       lengths=resolve_lengths(cfg, self.fp.max_position_embeddings))

    @property
    def num_classes(self) -> int:
        return num_span_classes(len(self.fp.full_layers) * self.fp.num_kv_heads,
                                self.cfg.max_span_classes)

    def make_plan(self, rules, choice, details: dict | None = None) -> Plan:
        """A plan of one rule per head, its head classes of one rule each. ``choice``
        has a row per full-attention layer (the only ones searched)."""
        cfg = self.cfg
        rows = dict(zip(self.fp.full_layers, choice))
        table = full_layer_rows(self.fp, lambda layer: [rules[int(r)].as_tuple()
                                                        for r in rows[layer]])
        return Plan(
            version=PLAN_VERSION, model=self.fp, sink_tokens=cfg.sink_tokens,
            elastic=cfg.elastic, min_window=cfg.min_window, granule=cfg.granule,
            exact_floor=cfg.exact_floor, max_span_classes=cfg.max_span_classes,
            rules=table,
            head_classes=single_rule_classes(table, self.num_classes,
                                             self.fp.max_position_embeddings, cfg.min_window),
            provenance=Provenance(method="moa-search", created=now_iso(), details=details or {}),
        )


def _start(cfg: SearchConfig) -> _Run:
    """The search at its first density (``at_density`` gives the others)."""
    import torch
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(cfg.model)
    fp = fingerprint_from_hf_config(hf_config)
    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    dataset = None if cfg.dataset is None else {"path": str(Path(cfg.dataset).resolve()),
                                                "file": _file_id(Path(cfg.dataset))}
    data_key = {"dataset": dataset, "answer_tokens": cfg.answer_tokens, "seed": cfg.seed,
                "data_version": 2}
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
    return _Run(cfg, fp, StageCache(work), _model_id(cfg.model, cfg.dtype), data_key, threads,
                lengths)


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
           "block": run.cfg.profile_block, "profile_version": 2}
    info, arrays = run.cache.get(f"profile_{length}", key, compute)
    return arrays["importance"], info


def _problem(run: _Run, profiles: dict, profile_info: dict):
    """Stage 3: the rule grid, each rule's loss per head and length, and the cost
    tables of the MILP."""
    from moa_vllm.planner.milp import Problem, cost_tables
    from moa_vllm.planner.rules import default_rules, parse_rules, rule_losses

    cfg, fp = run.cfg, run.fp
    with run.cache.timed("rule_losses"):
        rules = parse_rules(cfg.rules) if cfg.rules else default_rules(
            fp.max_position_embeddings, cfg.min_window, cfg.sink_tokens, cfg.density)
        lengths = run.lengths.density
        losses = np.stack([
            rule_losses(profiles[n], rules, n, cfg.profile_block, cfg.sink_tokens,
                        cfg.min_window, cfg.elastic,
                        int(round(profile_info[n]["mean_prompt_len"])), cfg.granule,
                        cfg.exact_floor)
            for n in sorted(profiles)
        ])[:, fp.full_layers]  # the model's windowed layers keep their window
        dens, held, dense = cost_tables(rules, lengths, cfg.sink_tokens, cfg.min_window,
                                        cfg.elastic, cfg.block_size, cfg.granule,
                                        cfg.exact_floor)
    prob = Problem(losses, dens, held, dense, cfg.density, _alloc_budget(cfg), run.num_classes,
                   cfg.budget_slack)
    return rules, losses, prob


def _alloc_budget(cfg: SearchConfig) -> float:
    return cfg.allocated_density if cfg.allocated_density is not None else cfg.density


def _pareto_front(run: _Run, rules, losses, prob) -> tuple[list, list]:
    """Stage 4: the epsilon-constraint sweep; every solution is checked with the
    runtime's own density functions against the program's budgets."""
    from moa_vllm.planner.milp import HeadClassMILP, pareto_sweep

    cfg = run.cfg
    lengths = run.lengths.density

    def verify(choice) -> bool:
        table = density_table(run.make_plan(rules, choice), lengths, cfg.block_size)
        return all(spent - 1e-9 <= d.average_density <= avg + 1e-9
                   and d.allocated_density <= alloc + 1e-9
                   for d, avg, alloc, spent in zip(table, prob.density_budget,
                                                   prob.allocated_budget, prob.spent_budget))

    def compute():
        program = HeadClassMILP(prob, verify, cfg.time_limit, cfg.mip_rel_gap)
        sols, solve_log = pareto_sweep(program, cfg.pareto_grid, cfg.progress)
        if not sols:
            raise RuntimeError("no feasible plan: relax --density, --max-span-classes or "
                               "the rule grid")
        return {"objectives": [s.objectives.tolist() for s in sols], "log": solve_log}, \
            {"choices": np.stack([s.choice for s in sols])}

    key = {"losses": _hash(losses.round(12).tolist()), "dl": lengths, "density": cfg.density,
           "alloc": _alloc_budget(cfg), "slack": cfg.budget_slack, "classes": run.num_classes,
           "grid": cfg.pareto_grid, "tl": cfg.time_limit, "gap": cfg.mip_rel_gap,
           "rules": [r.as_tuple() for r in rules], "elastic": cfg.elastic,
           "sink": cfg.sink_tokens, "minw": cfg.min_window, "granule": cfg.granule,
           "floor": cfg.exact_floor,
           "bs": cfg.block_size, "milp_version": 3}
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


def _mask_key(plan: Plan | None) -> list | None:
    """What a plan's exact mask depends on (None: dense): a validation cache key."""
    return None if plan is None else [plan.rules, plan.sink_tokens, plan.elastic,
                                      plan.min_window, plan.granule, plan.exact_floor]


def _validate(run: _Run, plans: list[Plan | None]) -> dict[int, list[float]]:
    """Stage 5: the answer loss of each plan (None: dense) at each unseen length."""
    from tqdm import tqdm

    from moa_vllm.planner import profile as P

    scores: dict[int, list[float]] = {}
    for length, n in zip(run.lengths.validate, run.lengths.validate_samples):
        vdata = _calibration(run, length, n, "valid")
        data_key = {"model": run.model_key, "data": run.data_key, "length": length, "n": n}
        scores[length] = []
        for plan in tqdm(plans, desc=f"validate {length}", disable=not run.cfg.progress,
                         leave=False):
            def compute(plan=plan):
                model, _ = run.model()
                return float(np.mean([P.masked_answer_loss(model, plan, s.ids, len(s.prompt))
                                      for s in vdata])), {}

            loss, _ = run.cache.get("validation", {"data": data_key, "plan": _mask_key(plan)},
                                    compute)
            scores[length].append(loss)
    return scores


RETRIEVAL_TASK = "recall"
RETRIEVAL_SEED = 7919  # added to --seed: prompts apart from the eval's (seed 0)


def _retrieval(run: _Run, plan: Plan | None) -> dict[int, list[bool]]:
    """Stage 6: which recall prompts (``moa_vllm.tasks``, facts at evenly spread
    depths of natural text) the plan's greedy answer gets right, per validation
    length (None: dense)."""
    from moa_vllm.planner import profile as P
    from moa_vllm.tasks import make_samples

    n = run.cfg.retrieval_samples
    depths = [(i + 0.5) / n for i in range(n)]
    solved = {}
    for length in run.lengths.validate:
        def compute(length=length):
            model, tok = run.model()
            samples = make_samples(tok, [RETRIEVAL_TASK], [length], depths, 1,
                                   seed=run.cfg.seed + RETRIEVAL_SEED)
            return [P.masked_completes(model, tok, plan, s.prompt, s.answer)
                    for s in samples], {}

        key = {"model": run.model_key, "task": RETRIEVAL_TASK, "length": length, "n": n,
               "seed": run.cfg.seed, "plan": _mask_key(plan), "retrieval_version": 1}
        solved[length], _ = run.cache.get("retrieval", key, compute)
    return solved


@dataclass(frozen=True)
class Retrieval:
    """Recall prompts solved over every validation length, beside dense's."""

    solved: int
    dense: int
    prompts: int

    @property
    def kept(self) -> float:
        """The fraction of dense's retrieval kept (1 where dense retrieves nothing)."""
        return self.solved / self.dense if self.dense else 1.0

    def meets(self, target: float) -> bool:
        return self.solved >= target * self.dense

    @staticmethod
    def of(solved: dict[int, list[bool]], dense: dict[int, list[bool]]) -> Retrieval:
        return Retrieval(sum(sum(v) for v in solved.values()),
                         sum(sum(v) for v in dense.values()),
                         sum(len(v) for v in dense.values()))


GAP_FLOOR = 0.05  # of the dense loss: where the uniform window is that close, noise rules


def choose(scores: dict[int, list[float]]) -> tuple[int, list[float]]:
    """The plan (index after dense and the uniform window) whose worst *excess* loss
    over dense, as a fraction of the equal-density uniform window's excess, is least,
    and every plan's score (0: dense's loss, 1: the uniform window's).

    Worst over lengths: a gain at long prompts cannot buy a loss at short ones. Excess
    over dense, not loss over uniform: the uniform window's loss varies by length far
    more than dense's (SmolLM2: 3.2x dense at 384 tokens, 1.1x at 6144), so a ratio
    to it made the long length, where every plan is near dense, pick the plan and let
    short prompts (most requests) keep twice the excess of another Pareto plan."""
    rel = []
    for dense, uniform, *plans in scores.values():
        gap = max(uniform - dense, GAP_FLOOR * dense)
        rel.append((np.array(plans) - dense) / gap)
    worst = np.max(rel, axis=0)
    return int(np.argmin(worst)), [float(x) for x in worst]


def _search_at(run: _Run, profiles: dict, profile_info: dict) -> tuple[Plan, Plan, dict]:
    """Stages 3-5 at ``run``'s density: the plan chosen on the validation loss, its
    equal-density uniform window, and the search's record."""
    cfg, lengths = run.cfg, run.lengths
    rules, losses, prob = _problem(run, profiles, profile_info)
    front, solve_log = _pareto_front(run, rules, losses, prob)
    # dense and the equal-density uniform window are scored beside the front
    uniform = uniform_plan(run.fp, cfg.density, sink_tokens=cfg.sink_tokens,
                           elastic=cfg.elastic, min_window=cfg.min_window, grow=True,
                           granule=cfg.granule, exact_floor=cfg.exact_floor)
    scores, best, relative = {}, 0, []
    if lengths.validate:
        scores = _validate(run, [None, uniform] + [run.make_plan(rules, c) for c, _ in front])
        best, relative = choose(scores)
        for n, v in scores.items():
            if v[2 + best] >= v[1]:
                log.warning("the chosen plan does not beat the uniform window at %d tokens "
                            "(%.4f vs %.4f): more calibration samples or profiling lengths "
                            "may help", n, v[2 + best], v[1])
    details = {
        "density": cfg.density,
        "allocated_density_budget": _alloc_budget(cfg),
        "budget_slack": cfg.budget_slack,
        "density_lengths": lengths.density,
        "rules_grid": [r.as_tuple() for r in rules],
        "solver": {"name": "scipy.optimize.milp (HiGHS)", "time_limit_s": cfg.time_limit,
                   "mip_rel_gap": cfg.mip_rel_gap, "pareto_grid": cfg.pareto_grid,
                   "solves": solve_log,
                   "total_solver_s": round(sum(e["seconds"] for e in solve_log), 2)},
        "pareto": [{"objectives": [round(float(x), 6) for x in o],
                    "validation_losses": {str(n): round(v[2 + i], 6) for n, v in scores.items()},
                    "excess_vs_uniform": round(relative[i], 6) if relative else None}
                   for i, (_, o) in enumerate(front)],
        "validation": {
            "lengths": lengths.validate, "samples": lengths.validate_samples, "chosen": best,
            "excess_vs_uniform": relative[best] if relative else None,
            "per_length": {str(n): {"dense_loss": v[0], "uniform_loss": v[1],
                                    "chosen_loss": v[2 + best]} for n, v in scores.items()}},
    }
    return run.make_plan(rules, front[best][0]), uniform, details


def _retrieval_record(run: _Run, plan: Plan, dense: dict[int, list[bool]]) -> dict:
    """The plan's recall beside dense's."""
    chosen = Retrieval.of(_retrieval(run, plan), dense)
    return {"density": run.cfg.density, "solved": chosen.solved, "kept": round(chosen.kept, 4),
            "meets_target": chosen.meets(run.cfg.retrieval_target)}


def run_search(cfg: SearchConfig) -> Plan:
    t_start = time.perf_counter()
    run = _start(cfg)
    lengths = run.lengths
    profiled = {n: _profile(run, n, k) for n, k in zip(lengths.profile, lengths.samples)}
    profiles = {n: imp for n, (imp, _) in profiled.items()}
    profile_info = {n: info for n, (_, info) in profiled.items()}

    budgets = sorted(cfg.densities) if cfg.density == "auto" else [cfg.density]
    dense = _retrieval(run, None) if lengths.validate else {}
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
        sweep.append(_retrieval_record(run, plan, dense))
        log.info("density %s: recall %d of dense's %d", density, sweep[-1]["solved"],
                 baseline.dense)
        if sweep[-1]["meets_target"]:
            break
    if sweep:  # the equal-density uniform window beside the plan written
        sweep[-1]["uniform_solved"] = Retrieval.of(_retrieval(run, uniform), dense).solved
    lengths = run.lengths
    if sweep and not sweep[-1]["meets_target"]:
        message = (f"no density up to {budgets[-1]} keeps {cfg.retrieval_target} of dense's "
                   f"retrieval (dense: {baseline.dense} of {baseline.prompts} recall prompts "
                   f"at {lengths.validate} tokens; the sweep: {sweep})")
        if cfg.density == "auto":
            raise RuntimeError(message + ": add higher --densities, or serve dense")
        log.warning(message)

    total = round(time.perf_counter() - t_start, 2)
    details.update({
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
        "total_seconds": total,
        "threads": run.threads,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "machine": f"{os.cpu_count()} CPUs",
    })
    plan.provenance.details.update(details)
    plan.provenance.details["densities"] = [
        {"length": d.length, "average": round(d.average_density, 5),
         "allocated": round(d.allocated_density, 5)}
        for d in density_table(plan, lengths.density, cfg.block_size)]
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    plan.save(cfg.out)
    log.info("wrote %s at density %s (validation %s) in %.1f s", cfg.out, run.cfg.density,
             details["validation"]["per_length"], total)
    return plan
