"""Rule assignment as mixed-integer linear programs (scipy.optimize.milp / HiGHS).

Binary ``x[l, h, r]``: KV head ``h`` of layer ``l`` uses rule ``r``. Common constraints:

* one rule per KV head: ``sum_r x[l,h,r] = 1``;
* at most ``R`` distinct rules per layer: ``x[l,h,r] <= u[l,r]``, ``sum_r u[l,r] <= R``;
* average density at every length ``p`` of interest (the exact per-head terms of
  ``span_classes.average_density``): ``sum x * dens[r,p] <= d * layers * heads``.

Allocated density is modelled with *layer* classes (layers sorted by their
widest window at ``max_position_embeddings``, cut into ``k`` equal classes, each
class holding the blocks of its widest window). The runtime's head classes
(``span_classes.head_class_assignment``) never hold more than those layer
classes when the head-class count is a multiple of ``k``, so the model is
conservative; every solution is still checked with the runtime's own
``span_classes.allocated_density`` (``verify``). It is handled in two steps:

1. ``LayerMILP`` (relaxation): each layer its own class,
   ``H[l,p] >= sum_r held[r,p] x[l,h,r]`` for every head and
   ``sum_l H[l,p] <= a * layers * D_p``. Exact when ``k = layers`` (and, with one
   class, ``C[p] >= H[l,p]``, exact when ``k = 1``); otherwise a relaxation (a
   class holds at least the mean of its layers). Its solution gives the classes
   the runtime would form for it (``runtime_partition``).
2. ``ClassCapMILP`` with that partition fixed: each class ``c`` picks a cap rule
   ``y[c,r]`` (one-hot); every head of a layer of class ``c`` must be covered by the
   cap at every length of interest and at ``max_position_embeddings``:
   ``sum_r held[r,p] x[l,h,r] <= sum_r held[r,p] y[c,r]`` (and the same with the
   window at the sort length); the budget is on the caps,
   ``sum_c sum_r held[r,p] y[c,r] <= a * k * D_p``; caps are ordered by key.
   Held blocks grow with the window, so the class really holds at most its cap:
   this is a conservative linearisation of the class maximum (it only loses when
   a class's maximum at different lengths comes from different rules), and it is
   small and tight (a few seconds where the exact max-with-free-partition model
   found no feasible point in minutes).

The runtime forms its own classes from the plan; every solution is therefore
checked with the runtime's own functions (``verify``). If the runtime's classes
differ from the assumed ones and break a budget, the MILP is solved again with the
runtime's partition (a few rounds), and a solution that still fails is dropped.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from moa_vllm.span_classes import cdiv, num_span_classes


@dataclass
class Problem:
    losses: np.ndarray  # [P_obj, layers, heads, rules]
    dens: np.ndarray  # [rules, P_cost] average-density term per head
    held: np.ndarray  # [rules, P_cost] held blocks of a class whose widest rule is r
    dense_blocks: np.ndarray  # [P_cost]
    keys: np.ndarray  # [rules] window at max_position_embeddings (class sort key)
    density: float
    allocated_density: float
    max_rules_per_layer: int = 2
    max_span_classes: int = 4

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.losses.shape[1:]


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


class LayerMILP:
    """Per-layer allocation (exact for ``k = 1`` or ``k = layers``, a relaxation
    otherwise); see the module docstring. The static constraint set; ``solve`` adds
    an objective and epsilon bounds."""

    def __init__(self, prob: Problem):
        self.prob = prob
        nl, nh, nr = prob.shape
        npc = prob.dens.shape[1]
        k = num_span_classes(nl, prob.max_span_classes)
        self.k = k
        n = 0

        def alloc(size):
            nonlocal n
            start = n
            n += size
            return start

        ix = alloc(nl * nh * nr)
        alloc(nl * nr)
        ic = alloc(npc) if k == 1 else None
        ih = alloc(nl * npc)
        self.n = n
        self.ix = ix
        b = _common_rows(prob, ix)
        X = lambda l, h, r: ix + (l * nh + h) * nr + r  # noqa: E731
        R = np.arange(nr)
        for l in range(nl):
            for p in range(npc):
                for h in range(nh):
                    b.add([ih + l * npc + p] + [X(l, h, r) for r in R],
                          np.concatenate([[1.0], -prob.held[:, p]]), 0, np.inf)
        dense = prob.dense_blocks.astype(float)
        if k == 1:
            for p in range(npc):
                for l in range(nl):
                    b.add([ic + p, ih + l * npc + p], [1, -1], 0, np.inf)
                b.add([ic + p], [1.0], -np.inf, prob.allocated_density * dense[p])
        else:
            for p in range(npc):
                b.add(ih + np.arange(nl) * npc + p, np.ones(nl), -np.inf,
                      prob.allocated_density * nl * dense[p])
        self.builder = b
        integrality = np.zeros(n)
        integrality[: ix + nl * nh * nr + nl * nr] = 1
        ub = np.ones(n)
        if k == 1:
            ub[ic : ic + npc] = dense
        ub[ih : ih + nl * npc] = np.tile(dense, nl)
        self.integrality = integrality
        self.bounds = Bounds(np.zeros(n), ub)

    def _matrix(self, extra: list[tuple[np.ndarray, float]]):
        b = self.builder
        rows, cols, vals = list(b.rows), list(b.cols), list(b.vals)
        lbs, ubs = list(b.lb), list(b.ub)
        nx = self.prob.losses[0].size
        for coef, bound in extra:
            r = len(lbs)
            rows.extend([r] * nx)
            cols.extend(range(self.ix, self.ix + nx))
            vals.extend(coef.reshape(-1).tolist())
            lbs.append(-np.inf)
            ubs.append(bound)
        a = sparse.csr_array((vals, (rows, cols)), shape=(len(lbs), self.n))
        return LinearConstraint(a, np.array(lbs), np.array(ubs))

    def solve(
        self,
        weights: np.ndarray,
        eps: dict[int, float] | None = None,
        time_limit: float = 60.0,
        mip_rel_gap: float = 1e-3,
    ) -> Solution:
        losses = self.prob.losses
        nx = losses[0].size
        c = np.zeros(self.n)
        obj = np.tensordot(weights, losses, axes=1).reshape(-1)
        # HiGHS is happier with coefficients of order one
        c[self.ix : self.ix + nx] = obj / max(np.abs(obj).max(), 1e-30)
        extra = []
        for q, bound in (eps or {}).items():
            scale = max(np.abs(losses[q]).max(), 1e-30)
            extra.append((losses[q] / scale, bound / scale))
        cons = self._matrix(extra)
        t0 = time.perf_counter()
        res = milp(
            c,
            integrality=self.integrality,
            bounds=self.bounds,
            constraints=cons,
            options={"time_limit": time_limit, "mip_rel_gap": mip_rel_gap, "disp": False},
        )
        secs = time.perf_counter() - t0
        nl, nh, nr = self.prob.shape
        if res.x is None:
            return Solution(np.zeros((0, 0), int), np.full(len(losses), np.inf), res.status,
                            res.message, secs, None, None)
        x = res.x[self.ix : self.ix + nx].reshape(nl, nh, nr)
        choice = x.argmax(-1)
        objs = np.array([losses[p][np.arange(nl)[:, None], np.arange(nh)[None], choice].sum()
                         for p in range(len(losses))])
        return Solution(choice, objs, res.status, res.message, secs,
                        getattr(res, "mip_gap", None), getattr(res, "mip_node_count", None))


class Assigner:
    """Solves one objective with the class handling of the module docstring."""

    def __init__(self, prob: Problem, verify=None, time_limit: float = 60.0,
                 mip_rel_gap: float = 1e-3, rounds: int = 3):
        self.prob = prob
        self.verify = verify or (lambda choice: True)
        self.time_limit = time_limit
        self.gap = mip_rel_gap
        self.rounds = rounds
        nl = prob.shape[0]
        self.k = num_span_classes(nl, prob.max_span_classes)
        self.exact_layer_model = self.k in (1, nl)
        self._layer = None
        self._caps: dict[tuple, ClassCapMILP] = {}
        self.partition: list[int] | None = None

    def layer_model(self) -> LayerMILP:
        if self._layer is None:
            self._layer = LayerMILP(self.prob)
        return self._layer

    def cap_model(self, partition: list[int]) -> ClassCapMILP:
        key = tuple(partition)
        if key not in self._caps:
            self._caps[key] = ClassCapMILP(self.prob, partition)
        return self._caps[key]

    def choose_partition(self, weights: np.ndarray) -> Solution | None:
        """The classes the runtime forms for the relaxation's optimum."""
        if self.exact_layer_model:
            return None
        sol = self.layer_model().solve(weights, None, self.time_limit, self.gap)
        if sol.choice.size:
            self.partition = runtime_partition(sol.choice, self.prob.keys, self.k)
        else:
            self.partition = contiguous_partition(self.prob.shape[0], self.k)
        return sol

    def solve(self, weights: np.ndarray, eps: dict[int, float] | None = None) -> Solution:
        if self.exact_layer_model:
            sol = self.layer_model().solve(weights, eps, self.time_limit, self.gap)
            sol.info["verified"] = bool(sol.choice.size) and bool(self.verify(sol.choice))
            return sol
        if self.partition is None:
            self.choose_partition(weights)
        part = self.partition
        seconds = 0.0
        for rnd in range(self.rounds):
            sol = self.cap_model(part).solve(weights, eps, self.time_limit, self.gap)
            seconds += sol.seconds
            sol.seconds = seconds
            sol.info.update(rounds=rnd + 1, partition=part)
            if not sol.choice.size:
                sol.info["verified"] = False
                return sol
            if self.verify(sol.choice):
                sol.info["verified"] = True
                return sol
            new = runtime_partition(sol.choice, self.prob.keys, self.k)
            if new == part:
                break
            part = new
        sol.info["verified"] = False
        return sol


def pareto_sweep(
    assigner: Assigner,
    grid: int = 3,
    progress: bool = True,
) -> tuple[list[Solution], list[dict]]:
    """Epsilon-constraint sweep over the per-length objectives.

    0. (span classes) the layer relaxation of the normalised sum fixes the classes;
    1. one solve per profiled length (its loss alone): the anchors, whose payoff
       table gives each objective's range;
    2. one solve of the normalised sum (each objective over its anchor minimum);
    3. the longest profiled length as the objective, every other length bounded
       by ``grid`` levels spread over its range (``grid ** (P - 1)`` solves).

    Returns the distinct non-dominated verified solutions and a log of every solve.
    """
    from tqdm import tqdm

    losses = assigner.prob.losses
    n_obj = len(losses)
    log: list[dict] = []
    sols: list[Solution] = []
    scale = np.array([max(losses[p].max(-1).sum(), 1e-30) for p in range(n_obj)])

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
            "rounds": sol.info.get("rounds"),
        })

    total = n_obj + (1 + grid ** (n_obj - 1) if n_obj > 1 else 0) + 1
    with tqdm(total=total, desc="MILP solves", disable=not progress, leave=False) as bar:
        relax = assigner.choose_partition(1.0 / scale)
        if relax is not None:
            record("layer relaxation (fixes span classes)", relax, None)
            log[-1]["partition"] = assigner.partition
        bar.update(1)

        def run(name, w, eps=None):
            sol = assigner.solve(w, eps)
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


class ClassCapMILP(LayerMILP):
    """Span classes fixed by ``partition[l]``, one cap rule per class (module docstring)."""

    def __init__(self, prob: Problem, partition: list[int]):
        self.prob = prob
        nl, nh, nr = prob.shape
        npc = prob.dens.shape[1]
        k = num_span_classes(nl, prob.max_span_classes)
        s = nl // k
        if sorted(np.bincount(partition, minlength=k).tolist()) != [s] * k:
            raise ValueError(f"partition must put {s} layers in each of {k} classes")
        self.k = k
        self.partition = [int(c) for c in partition]
        ix, iu, iy = 0, nl * nh * nr, nl * nh * nr + nl * nr
        self.n = iy + k * nr
        self.ix = ix
        b = _common_rows(prob, ix)
        X = lambda l, h, r: ix + (l * nh + h) * nr + r  # noqa: E731
        R = np.arange(nr)
        dense = prob.dense_blocks.astype(float)
        for c in range(k):
            b.add(iy + c * nr + R, np.ones(nr), 1, 1)
        for p in range(npc):
            b.add([iy + c * nr + r for c in range(k) for r in R], np.tile(prob.held[:, p], k),
                  -np.inf, prob.allocated_density * k * dense[p])
        uniq = np.unique(prob.keys)
        rank = np.searchsorted(uniq, prob.keys).astype(float)
        for c in range(k - 1):
            b.add(list(iy + c * nr + R) + list(iy + (c + 1) * nr + R),
                  np.concatenate([rank, -rank]), -np.inf, 0)
        cover = np.concatenate([prob.held.astype(float), rank[:, None]], 1)
        for l in range(nl):
            c = self.partition[l]
            for h in range(nh):
                for p in range(cover.shape[1]):
                    b.add([X(l, h, r) for r in R] + list(iy + c * nr + R),
                          np.concatenate([cover[:, p], -cover[:, p]]), -np.inf, 0)
        self.builder = b
        self.integrality = np.ones(self.n)
        self.bounds = Bounds(np.zeros(self.n), np.ones(self.n))


def _common_rows(prob: Problem, ix: int) -> _Builder:
    """One rule per head, at most R rules per layer (``u`` follows ``x``), average density."""
    nl, nh, nr = prob.shape
    iu = ix + nl * nh * nr
    b = _Builder()
    R = np.arange(nr)
    X = lambda l, h, r: ix + (l * nh + h) * nr + r  # noqa: E731
    for l in range(nl):
        for h in range(nh):
            b.add([X(l, h, r) for r in R], np.ones(nr), 1, 1)
            for r in R:
                b.add([X(l, h, r), iu + l * nr + r], [1, -1], -np.inf, 0)
        b.add(iu + l * nr + R, np.ones(nr), -np.inf, prob.max_rules_per_layer)
    for p in range(prob.dens.shape[1]):
        cols = [X(l, h, r) for l in range(nl) for h in range(nh) for r in R]
        b.add(cols, np.tile(prob.dens[:, p], nl * nh), -np.inf, prob.density * nl * nh)
    return b


def contiguous_partition(num_layers: int, k: int) -> list[int]:
    """Classes of consecutive layers (what the runtime forms for a uniform plan)."""
    s = num_layers // k
    return [l // s for l in range(num_layers)]


def runtime_partition(choice: np.ndarray, keys: np.ndarray, k: int) -> list[int]:
    """The layer classes (sorted by widest window) of a rule choice ``[layers, heads]``."""
    nl = choice.shape[0]
    widest = keys[choice].max(1)
    order = sorted(range(nl), key=lambda l: (widest[l], l))
    s = nl // k
    part = [0] * nl
    for i, l in enumerate(order):
        part[l] = i // s
    return part


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


def cost_tables(rules, lengths, sink_tokens, min_window, elastic, block_size, max_position):
    """dens/held ``[rules, lengths]``, dense blocks ``[lengths]`` and class keys ``[rules]``."""
    from moa_vllm.planner.rules import rule_density, rule_held_blocks

    dens = np.array([[rule_density(r, n, sink_tokens, min_window, elastic) for n in lengths] for r in rules])
    held = np.array([[rule_held_blocks(r, n, sink_tokens, min_window, elastic, block_size)
                      for n in lengths] for r in rules])
    dense = np.array([cdiv(n, block_size) for n in lengths])
    keys = np.array([r.window(max_position, min_window) for r in rules])
    return dens, held, dense, keys
