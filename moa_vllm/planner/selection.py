"""How `plan search` chooses: the Pareto plan by its validation loss against dense
and the uniform window, the density by the retrieval it keeps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GAP_FLOOR = 0.05  # of the dense loss: where the uniform window is that close, noise rules


@dataclass(frozen=True)
class LengthScores:
    """Answer losses at one validation length."""

    dense: float
    uniform: float  # the equal-density uniform window
    plans: list[float]  # the Pareto plans, in front order


def choose(scores: dict[int, LengthScores]) -> tuple[int, list[float]]:
    """The Pareto plan whose worst *excess* loss over dense, as a fraction of the
    equal-density uniform window's excess, is least, and every plan's score (0:
    dense's loss, 1: the uniform window's).

    Worst over lengths: a gain at long prompts cannot buy a loss at short ones. Excess
    over dense, not loss over uniform: the uniform window's loss varies by length far
    more than dense's (SmolLM2: 3.2x dense at 384 tokens, 1.1x at 6144), so a ratio
    to it made the long length, where every plan is near dense, pick the plan and let
    short prompts (most requests) keep twice the excess of another Pareto plan."""
    rel = []
    for s in scores.values():
        gap = max(s.uniform - s.dense, GAP_FLOOR * s.dense)
        rel.append((np.array(s.plans) - s.dense) / gap)
    worst = np.max(rel, axis=0)
    return int(np.argmin(worst)), [float(x) for x in worst]


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
