"""Every option of `moa-vllm plan search`: one ``SearchConfig`` field each, with its
help (``planner.cli`` derives the command line from the dataclass)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field

from moa_vllm.span_mask import SpanParams


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
    max_head_classes: int = _opt(9, "head classes (KV-cache groups) at most, one rule each: "
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

    @property
    def span_params(self) -> SpanParams:
        """The span parameters every rule of the plan shares."""
        return SpanParams(self.sink_tokens, self.min_window, self.elastic, self.granule,
                          self.exact_floor)

    @property
    def allocated_budget(self) -> float:
        """The allocated-density budget (``--allocated-density``, else ``--density``)."""
        return self.allocated_density if self.allocated_density is not None else self.density
