"""The stages of `plan search`: calibrate -> profile -> rule losses -> MILP sweep ->
validate (answer loss) and retrieval.

Each cached stage has a frozen inputs dataclass holding everything its result
depends on; the ``StageCache`` key is derived from it, and the stage's computation
reads its inputs (and the model they identify), so an option can never be left
out of a key. A ``*_version`` field changes only when the stage's code changes
what it computes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from moa_vllm.plan import (
    PLAN_VERSION,
    ModelFingerprint,
    Plan,
    Provenance,
    full_layer_rows,
    now_iso,
)
from moa_vllm.plan_report import density_table
from moa_vllm.planner.lengths import SearchLengths, resolve_lengths
from moa_vllm.planner.search_config import SearchConfig
from moa_vllm.planner.selection import LengthScores
from moa_vllm.planner.stage_cache import StageCache, key_hash
from moa_vllm.span_classes import num_head_classes, single_rule_classes
from moa_vllm.span_mask import SpanParams

log = logging.getLogger("moa_vllm.planner")

RETRIEVAL_TASK = "recall"
RETRIEVAL_SEED = 7919  # added to --seed: prompts apart from the eval's (seed 0)


@dataclass(frozen=True)
class Data:
    """What the calibration prompts and their dense targets depend on, besides the
    model and the length."""

    dataset: dict | None  # --dataset's resolved path and file id; None: synthetic
    answer_tokens: int
    seed: int
    data_version: int = 2


@dataclass(frozen=True)
class CalibrationInputs:
    model: dict  # ``stage_cache.model_id``
    data: Data
    length: int
    n: int
    split: str  # "calib" (profiling) or "valid" (validation)


@dataclass(frozen=True)
class ProfileInputs:
    model: dict
    data: Data
    length: int
    n: int
    block: int  # the importance tile
    profile_version: int = 2


@dataclass(frozen=True)
class MilpInputs:
    losses: str  # hash of the [lengths, layers, KV heads, rules] loss table
    rules: tuple[tuple[int, float], ...]
    density_lengths: tuple[int, ...]
    density: float
    allocated_density: float
    budget_slack: float
    num_classes: int
    spans: SpanParams
    block_size: int
    pareto_grid: int
    time_limit: float
    mip_rel_gap: float
    milp_version: int = 4


@dataclass(frozen=True)
class MaskInputs:
    """What a plan's exact mask depends on besides the model."""

    rules: list
    spans: SpanParams

    @staticmethod
    def of(plan: Plan | None) -> MaskInputs | None:
        return None if plan is None else MaskInputs(plan.rules, plan.span_params)


@dataclass(frozen=True)
class ValidationInputs:
    samples: CalibrationInputs  # the "valid" split at one length
    plan: MaskInputs | None  # None: dense
    validation_version: int = 2


@dataclass(frozen=True)
class RetrievalInputs:
    model: dict
    task: str
    length: int
    n: int
    seed: int
    plan: MaskInputs | None  # None: dense
    retrieval_version: int = 2


@dataclass
class SearchRun:
    """What every stage of one search at one density reads."""

    cfg: SearchConfig  # its density a number
    fp: ModelFingerprint
    cache: StageCache
    model_key: dict
    data: Data
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

    def at_density(self, density: float) -> SearchRun:
        """The same search at another budget (the density lengths follow it)."""
        cfg = replace(self.cfg, density=density)
        return replace(self, cfg=cfg,
                       lengths=resolve_lengths(cfg, self.fp.max_position_embeddings))

    @property
    def num_classes(self) -> int:
        return num_head_classes(len(self.fp.full_layers) * self.fp.num_kv_heads,
                                self.cfg.max_head_classes)

    def make_plan(self, rules, choice, details: dict | None = None) -> Plan:
        """A plan of one rule per head, its head classes of one rule each. ``choice``
        has a row per full-attention layer (the only ones searched)."""
        cfg = self.cfg
        rows = dict(zip(self.fp.full_layers, choice))
        table = full_layer_rows(self.fp, lambda layer: [rules[int(r)].as_tuple()
                                                        for r in rows[layer]])
        return Plan(
            version=PLAN_VERSION, model=self.fp, **asdict(cfg.span_params),
            max_head_classes=cfg.max_head_classes, rules=table,
            head_classes=single_rule_classes(table, self.num_classes,
                                             self.fp.max_position_embeddings, cfg.min_window),
            provenance=Provenance(method="moa-search", created=now_iso(), details=details or {}),
        )

    def samples(self, length: int, n: int, split: str) -> CalibrationInputs:
        return CalibrationInputs(self.model_key, self.data, length, n, split)


def calibration(run: SearchRun, inputs: CalibrationInputs) -> list:
    """Stage 1: prompts with the dense model's answers."""
    from moa_vllm.planner import data as D

    def compute():
        model, tok = run.model()
        data = inputs.data
        seed = data.seed if inputs.split == "calib" else data.seed + 1000003
        out = D.build_samples(model, tok, inputs.length, inputs.n, data.answer_tokens, seed,
                              data.dataset and data.dataset["path"], run.cfg.progress)
        return [s.to_json() for s in out], {}

    value, _ = run.cache.get(f"calibration_{inputs.split}_{inputs.length}", inputs, compute)
    return [D.Sample.from_json(d) for d in value]


def profile(run: SearchRun, length: int, n: int) -> tuple[np.ndarray, dict]:
    """Stage 2: each head's mean influence on the answer loss, per key tile."""
    from moa_vllm.planner import profile as P

    inputs = ProfileInputs(run.model_key, run.data, length, n, run.cfg.profile_block)
    samples = calibration(run, run.samples(length, n, "calib"))

    def compute():
        model, _ = run.model()
        importance, info = P.profile_length(model, samples, inputs.length, inputs.block,
                                            run.cfg.progress)
        return info, {"importance": importance}

    info, arrays = run.cache.get(f"profile_{length}", inputs, compute)
    return arrays["importance"], info


def rule_losses(run: SearchRun, profiles: dict, profile_info: dict):
    """Stage 3: the rule grid and each rule's loss per head and profiled length."""
    from moa_vllm.planner.rules import default_rules, parse_rules, rule_losses

    cfg, fp, spans = run.cfg, run.fp, run.cfg.span_params
    with run.cache.timed("rule_losses"):
        rules = parse_rules(cfg.rules) if cfg.rules else default_rules(
            fp.max_position_embeddings, spans, cfg.density)
        losses = np.stack([
            rule_losses(profiles[n], rules, n, cfg.profile_block, spans,
                        int(round(profile_info[n]["mean_prompt_len"])))
            for n in sorted(profiles)
        ])[:, fp.full_layers]  # the model's windowed layers keep their window
    return rules, losses


def milp_inputs(cfg: SearchConfig, lengths: SearchLengths, num_classes: int, rules,
                losses: np.ndarray) -> MilpInputs:
    """What the MILP stage reads: its cache key."""
    return MilpInputs(
        key_hash(losses.round(12).tolist()), tuple(r.as_tuple() for r in rules),
        tuple(lengths.density), cfg.density, cfg.allocated_budget, cfg.budget_slack,
        num_classes, cfg.span_params, cfg.block_size, cfg.pareto_grid, cfg.time_limit,
        cfg.mip_rel_gap)


def pareto_front(run: SearchRun, rules, losses) -> tuple[list, list]:
    """Stage 4: the MILP's cost tables and its epsilon-constraint sweep; every
    solution is checked with the runtime's own density functions against the
    program's budgets."""
    from moa_vllm.planner.milp import HeadClassMILP, Problem, cost_tables, pareto_sweep

    cfg = run.cfg
    inputs = milp_inputs(cfg, run.lengths, run.num_classes, rules, losses)
    lengths = list(inputs.density_lengths)
    prob = Problem(losses, *cost_tables(rules, lengths, inputs.spans, inputs.block_size),
                   inputs.density, inputs.allocated_density, inputs.num_classes,
                   inputs.budget_slack)

    def verify(choice) -> bool:
        table = density_table(run.make_plan(rules, choice), lengths, inputs.block_size)
        return all(spent - 1e-9 <= d.average_density <= avg + 1e-9
                   and d.allocated_density <= alloc + 1e-9
                   for d, avg, alloc, spent in zip(table, prob.density_budget,
                                                   prob.allocated_budget, prob.spent_budget))

    def compute():
        program = HeadClassMILP(prob, verify, inputs.time_limit, inputs.mip_rel_gap)
        sols, solve_log = pareto_sweep(program, inputs.pareto_grid, cfg.progress)
        if not sols:
            raise RuntimeError("no feasible plan: relax --density, --max-head-classes or "
                               "the rule grid")
        return {"objectives": [s.objectives.tolist() for s in sols], "log": solve_log}, \
            {"choices": np.stack([s.choice for s in sols])}

    value, arrays = run.cache.get("milp", inputs, compute)
    front = list(zip(arrays["choices"], map(np.array, value["objectives"])))
    solve_log = value["log"]
    log.info("MILP: %d solves, %.1f s solver time, %d Pareto plans", len(solve_log),
             sum(e["seconds"] for e in solve_log), len(front))
    if len(front) > cfg.max_validate:
        # keep an even spread over the front (sorted by the longest length's loss)
        idx = np.unique(np.linspace(0, len(front) - 1, cfg.max_validate).round().astype(int))
        front = [front[i] for i in idx]
    return front, solve_log


def validate(run: SearchRun, uniform: Plan, plans: list[Plan]) -> dict[int, LengthScores]:
    """Stage 5: the answer loss of dense, the uniform window and each plan at each
    unseen length."""
    from tqdm import tqdm

    from moa_vllm.planner import profile as P

    scores = {}
    for length, n in zip(run.lengths.validate, run.lengths.validate_samples):
        samples = run.samples(length, n, "valid")
        vdata = calibration(run, samples)
        losses = []
        for plan in tqdm([None, uniform, *plans], desc=f"validate {length}",
                         disable=not run.cfg.progress, leave=False):
            def compute(plan=plan):
                model, _ = run.model()
                return float(np.mean([P.masked_answer_loss(model, plan, s.ids, len(s.prompt))
                                      for s in vdata])), {}

            loss, _ = run.cache.get("validation",
                                    ValidationInputs(samples, MaskInputs.of(plan)), compute)
            losses.append(loss)
        scores[length] = LengthScores(losses[0], losses[1], losses[2:])
    return scores


def retrieval(run: SearchRun, plan: Plan | None) -> dict[int, list[bool]]:
    """Stage 6: which recall prompts (``moa_vllm.tasks``, facts at evenly spread
    depths of natural text) the plan's greedy answer gets right, per validation
    length (None: dense)."""
    from moa_vllm.planner import profile as P
    from moa_vllm.tasks import make_samples

    solved = {}
    for length in run.lengths.validate:
        inputs = RetrievalInputs(run.model_key, RETRIEVAL_TASK, length,
                                 run.cfg.retrieval_samples, run.cfg.seed, MaskInputs.of(plan))

        def compute(inputs=inputs):
            model, tok = run.model()
            depths = [(i + 0.5) / inputs.n for i in range(inputs.n)]
            samples = make_samples(tok, [inputs.task], [inputs.length], depths, 1,
                                   seed=inputs.seed + RETRIEVAL_SEED)
            return [P.masked_completes(model, tok, plan, s.prompt, s.answer)
                    for s in samples], {}

        solved[length], _ = run.cache.get("retrieval", inputs, compute)
    return solved
