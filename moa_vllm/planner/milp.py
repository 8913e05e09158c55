"""Rule and head-class assignment as one mixed-integer linear program
(scipy.optimize.milp / HiGHS).

The runtime frees KV blocks per head class (``span_classes``): a set of equal
size of KV heads (layer, KV head), holding the blocks of its widest rule. The search
gives every class one rule, so each KV head holds exactly its own rule's blocks and
the allocated density *is* the average density (within block rounding). Classes
of one rule are interchangeable, so the program needs no class variables beyond a
count per rule:

* binary ``x[s, r]``: KV head ``s`` (layer, KV head) uses rule ``r``; ``sum_r x = 1``;
* integer ``m[r]``: classes holding rule ``r``; ``sum_s x[s, r] = size * m[r]``
  (``size`` = KV heads per class, so ``sum_r m[r]`` is the class count);
* average density at every length ``p`` of interest (the per-head terms of
  ``span_classes.average_density``): ``sum x * dens[r, p] <= budget[p] * heads``;
* allocated density (the block pool): ``sum x * held[r, p] <= alloc[p] * heads *
  dense_blocks[p]``, exact for single-rule classes;
* the budget is also spent: ``sum x * dens[r, p] >= (budget[p] - slack) * heads``,
  so a plan cannot leave budget unused at one length (short prompts, most
  requests) to lower the loss at another.

Budgets are ``max(density, the smallest density any rule reaches at p)``: at a
few hundred tokens the sinks and ``min_window`` alone can exceed the budget, and
every head is then at its floor. The KV heads of each rule become its classes in
``span_classes.single_rule_classes``; every solution is checked with the
runtime's own functions (``verify``).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from moa_vllm.span_classes import cdiv


@dataclass
class Problem:
    losses: np.ndarray  # [P_obj, layers, heads, rules]
    dens: np.ndarray  # [rules, P_cost] average-density term per head
    held: np.ndarray  # [rules, P_cost] held blocks of a KV head with rule r
    dense_blocks: np.ndarray  # [P_cost]
    density: float
    allocated_density: float
    num_classes: int
    budget_slack: float | None = None  # None: the budget is a ceiling only

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.losses.shape[1:]

    @property
    def density_budget(self) -> np.ndarray:
        """``[P_cost]``: the budget, or the floor where no rule is below it."""
        return np.maximum(self.density, self.dens.min(0))

    @property
    def allocated_budget(self) -> np.ndarray:
        return np.maximum(self.allocated_density, self.held.min(0) / self.dense_blocks)

    @property
    def spent_budget(self) -> np.ndarray:
        """``[P_cost]``: the least average density a plan spends (0: no floor)."""
        if self.budget_slack is None:
            return np.zeros(self.dens.shape[1])
        return np.minimum(self.density_budget - self.budget_slack, self.dens.max(0))


@dataclass
class Solution:
    choice: np.ndarray  # [layers, heads] rule index
    objectives: np.ndarray  # [P_obj] loss at each profiled length
    status: int
    message: str
    seconds: float
    mip_gap: float | None
    nodes: int | None
    info: dict = field(default_factory=dict)


class _Builder:
    def __init__(self):
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lb: list[float] = []
        self.ub: list[float] = []

    def add(self, cols, vals, lb, ub):
        r = len(self.lb)
        self.rows.extend([r] * len(cols))
        self.cols.extend(int(c) for c in cols)
        self.vals.extend(float(v) for v in vals)
        self.lb.append(lb)
        self.ub.append(ub)


class HeadClassMILP:
    """The program of the module docstring; ``solve`` adds an objective and
    epsilon bounds on the other lengths' losses."""

    def __init__(self, prob: Problem, verify=None, time_limit: float = 60.0,
                 mip_rel_gap: float = 1e-3):
        self.prob = prob
        self.verify = verify or (lambda choice: True)
        self.time_limit = time_limit
        self.gap = mip_rel_gap
        nl, nh, nr = prob.shape
        heads = nl * nh
        k = prob.num_classes
        if heads % k:
            raise ValueError(f"{k} head classes do not split {heads} KV heads evenly")
        size = heads // k
        self.nx = nx = heads * nr
        self.n = nx + nr
        b = _Builder()
        rules = np.arange(nr)
        for s in range(heads):
            b.add(s * nr + rules, np.ones(nr), 1, 1)
        for r in range(nr):
            b.add(list(r + nr * np.arange(heads)) + [nx + r],
                  np.concatenate([np.ones(heads), [-size]]), 0, 0)
        all_x = np.arange(nx)
        for p in range(prob.dens.shape[1]):
            b.add(all_x, np.tile(prob.dens[:, p], heads), prob.spent_budget[p] * heads,
                  prob.density_budget[p] * heads)
            b.add(all_x, np.tile(prob.held[:, p], heads), -np.inf,
                  prob.allocated_budget[p] * heads * prob.dense_blocks[p])
        self.builder = b
        self.integrality = np.ones(self.n)
        ub = np.ones(self.n)
        ub[nx:] = k
        self.bounds = Bounds(np.zeros(self.n), ub)

    def _constraints(self, extra: list[tuple[np.ndarray, float]]) -> LinearConstraint:
        b = self.builder
        rows, cols, vals = list(b.rows), list(b.cols), list(b.vals)
        lbs, ubs = list(b.lb), list(b.ub)
        for coef, bound in extra:
            r = len(lbs)
            rows.extend([r] * self.nx)
            cols.extend(range(self.nx))
            vals.extend(coef.reshape(-1).tolist())
            lbs.append(-np.inf)
            ubs.append(bound)
        a = sparse.csr_array((vals, (rows, cols)), shape=(len(lbs), self.n))
        return LinearConstraint(a, np.array(lbs), np.array(ubs))

    def solve(self, weights: np.ndarray, eps: dict[int, float] | None = None) -> Solution:
        losses = self.prob.losses
        c = np.zeros(self.n)
        obj = np.tensordot(weights, losses, axes=1).reshape(-1)
        # HiGHS is happier with coefficients of order one
        c[: self.nx] = obj / max(np.abs(obj).max(), 1e-30)
        extra = []
        for q, bound in (eps or {}).items():
            scale = max(np.abs(losses[q]).max(), 1e-30)
            extra.append((losses[q] / scale, bound / scale))
        t0 = time.perf_counter()
        res = milp(c, integrality=self.integrality, bounds=self.bounds,
                   constraints=self._constraints(extra),
                   options={"time_limit": self.time_limit, "mip_rel_gap": self.gap,
                            "disp": False})
        secs = time.perf_counter() - t0
        nl, nh, nr = self.prob.shape
        if res.x is None:
            return Solution(np.zeros((0, 0), int), np.full(len(losses), np.inf), res.status,
                            res.message, secs, None, None, {"verified": False})
        choice = res.x[: self.nx].reshape(nl, nh, nr).argmax(-1)
        objs = np.array([losses[p][np.arange(nl)[:, None], np.arange(nh)[None], choice].sum()
                         for p in range(len(losses))])
        return Solution(choice, objs, res.status, res.message, secs,
                        getattr(res, "mip_gap", None), getattr(res, "mip_node_count", None),
                        {"verified": bool(self.verify(choice))})


def sweep_solves(objectives: int, grid: int) -> int:
    """How many MILPs ``pareto_sweep`` solves."""
    return objectives + (1 + grid ** (objectives - 1) if objectives > 1 else 0)


def pareto_sweep(
    program: HeadClassMILP,
    grid: int = 3,
    progress: bool = True,
) -> tuple[list[Solution], list[dict]]:
    """Epsilon-constraint sweep over the per-length objectives.

    1. one solve per profiled length (its loss alone): the anchors, whose payoff
       table gives each objective's range;
    2. one solve of the normalised sum (each objective over its anchor minimum);
    3. the longest profiled length as the objective, every other length bounded
       by ``grid`` levels spread over its range (``grid ** (P - 1)`` solves).

    Returns the distinct non-dominated verified solutions and a log of every solve.
    """
    from tqdm import tqdm

    losses = program.prob.losses
    n_obj = len(losses)
    log: list[dict] = []
    sols: list[Solution] = []

    def record(name, sol, eps):
        log.append({
            "name": name,
            "eps": {int(k): float(v) for k, v in (eps or {}).items()},
            "status": int(sol.status),
            "seconds": round(sol.seconds, 3),
            "mip_gap": None if sol.mip_gap is None else float(sol.mip_gap),
            "nodes": None if sol.nodes is None else int(sol.nodes),
            "objectives": [float(o) for o in sol.objectives],
            "verified": sol.info.get("verified"),
        })

    total = sweep_solves(n_obj, grid)
    with tqdm(total=total, desc="MILP solves", disable=not progress, leave=False) as bar:
        def run(name, w, eps=None):
            sol = program.solve(w, eps)
            sols.append(sol)
            record(name, sol, eps)
            bar.update(1)

        for p in range(n_obj):
            w = np.zeros(n_obj)
            w[p] = 1
            run(f"min loss[{p}]", w)
        ok = [s for s in sols if s.info.get("verified")]
        if n_obj > 1 and ok:
            table = np.array([s.objectives for s in ok])
            lo, hi = table.min(0), table.max(0)
            run("normalised sum", 1.0 / np.maximum(lo, 1e-30))
            primary = n_obj - 1
            others = [q for q in range(n_obj) if q != primary]
            levels = [np.linspace(lo[q], hi[q], grid + 1)[1:] if grid > 1 else [hi[q]] for q in others]
            for combo in itertools.product(*levels):
                eps = {q: float(v) * (1 + 1e-9) + 1e-12 for q, v in zip(others, combo)}
                w = np.zeros(n_obj)
                w[primary] = 1
                run(f"min loss[{primary}] s.t. eps", w, eps)
    return pareto_filter([s for s in sols if s.info.get("verified")]), log


def pareto_filter(sols: list[Solution]) -> list[Solution]:
    ok = [s for s in sols if s.choice.size and np.isfinite(s.objectives).all()]
    uniq: dict[bytes, Solution] = {}
    for s in ok:  # distinct plans with distinct objectives (ties: the first found)
        uniq.setdefault(np.round(s.objectives, 9).tobytes(), s)
    cand = list(uniq.values())
    front = []
    for s in cand:
        dominated = any(
            (o.objectives <= s.objectives + 1e-12).all() and (o.objectives < s.objectives - 1e-12).any()
            for o in cand
        )
        if not dominated:
            front.append(s)
    return sorted(front, key=lambda s: tuple(s.objectives[::-1]))


def cost_tables(rules, lengths, params, block_size):
    """dens/held ``[rules, lengths]`` and dense blocks ``[lengths]`` under ``params``
    (``SpanParams``)."""
    from moa_vllm.planner.rules import rule_density, rule_held_blocks

    dens = np.array([[rule_density(r, n, params) for n in lengths] for r in rules])
    held = np.array([[rule_held_blocks(r, n, params, block_size) for n in lengths]
                     for r in rules])
    dense = np.array([cdiv(n, block_size) for n in lengths])
    return dens, held, dense
