"""`moa-vllm eval`: accuracy and fidelity of MoA against dense and uniform windows,
all through the real vLLM engine (the serving path), on the same prompts.

Each method is one engine: ``dense`` is vLLM's own backend; every other method is
the MoA backend with a plan (MoA plans, and StreamingLLM-style uniform plans with
the same sinks). Beside every accuracy, the KV memory each request held, read from
that engine's block pool in the same run (not predicted). Results: a JSON file, a
markdown table, and plots.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from moa_vllm import envs
from moa_vllm.evaluation.machine import provenance, provenance_lines
from moa_vllm.tasks import english_token_windows, is_correct, make_samples
from moa_vllm.plan import Plan, fingerprint_from_hf_config, load_plan, uniform_plan
from moa_vllm.plan_report import density_table

TOP_K = 20  # vLLM's logprobs cap: fidelity is measured on the dense top-20
EVAL_DTYPE = "float32"  # default model dtype of the engines; KV@n is over the model's cache in it


@dataclass
class Method:
    name: str
    plan: Plan | None  # None: vLLM's own dense backend
    kv_cache_dtype: str = "auto"  # KV held is reported against the model's dense cache
    path: str | None = None  # the plan file, fingerprinted in the report's provenance


@dataclass
class MethodResult:
    name: str
    densities: dict[int, dict[str, float]] = field(default_factory=dict)
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> "len/depth"
    accuracy_by_filler: dict[str, dict[str, float]] = field(default_factory=dict)
    kv_fraction: dict[int, float] = field(default_factory=dict)  # held / the model's own cache
    effective_length: dict[str, int] = field(default_factory=dict)
    perplexity: dict[int, float] = field(default_factory=dict)
    top1_agreement: dict[int, float] = field(default_factory=dict)
    kl_top20: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0


def methods_from_args(model_dir, plans: list[str], uniform: list[float],
                      uniform_length: int | None = None,
                      uniform_elastic: list[str] | None = None,
                      kv_cache_dtypes: tuple[str, ...] = ("auto",)) -> list[Method]:
    """dense, the uniform baselines, then the MoA plans (``NAME=PATH``), each with
    every KV cache dtype of ``kv_cache_dtypes`` (names suffixed ``@fp8`` etc.).

    Uniform baselines have the MoA plans' density at every length (the window
    grows with the input) in each elastic mode of the plans (default ``prompt``:
    StreamingLLM's window sized to each prompt); ``uniform_length`` gives the old
    fixed window instead, sized at that length."""
    from transformers import AutoConfig

    fp = fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir))
    moa = []
    for spec in plans:
        name, _, path = spec.rpartition("=")
        moa.append(Method(name or Path(path).stem, load_plan(path, fp), path=path))
    modes = uniform_elastic or sorted({m.plan.elastic for m in moa}) or ["prompt"]
    # the plans' granule: the baselines read whole blocks as the plans do, on the same
    # attention path (on CPU, vLLM's op; granule 1 would run the torch path)
    granule = max((m.plan.granule for m in moa), default=1)
    methods = [Method("dense", None)]
    for d in uniform:
        if uniform_length:
            methods.append(Method(f"uniform-{d}-fixed{uniform_length}",
                                  uniform_plan(fp, d, length=uniform_length)))
            continue
        methods += [Method(f"uniform-{d}-{mode}",
                           uniform_plan(fp, d, elastic=mode, grow=True, granule=granule))
                    for mode in modes]
    return [m if dtype == "auto" else Method(f"{m.name}@{dtype}", m.plan, dtype, m.path)
            for m in methods + moa for dtype in kv_cache_dtypes]


def start_engine(model_dir, method: Method, workdir: Path, max_model_len: int, dtype: str):
    """One engine per method; a MoA plan is handed over in ``additional_config``."""
    from vllm import LLM

    options = dict(model=str(model_dir), dtype=dtype, enforce_eager=True,
                   max_model_len=max_model_len, max_num_seqs=4, seed=0,
                   kv_cache_memory_bytes=int(envs.get(envs.MOA_EVAL_KV_BYTES)),
                   max_logprobs=TOP_K, kv_cache_dtype=method.kv_cache_dtype)
    if method.plan is None:
        return LLM(**options)  # vLLM's default block size, as MoA's engines below
    path = workdir / f"plan-{method.name}.json"
    method.plan.save(path)
    return LLM(attention_backend="moa", additional_config={"moa": {"plan": str(path)}},
               **options)


def kv_bytes_per_token(model_dir, dtype: str, kv_cache_dtype: str = "auto") -> int:
    """A dense cache's bytes per token (every layer and KV head, K and V)."""
    fp = _fingerprint(model_dir)
    return fp.num_layers * _layer_bytes_per_token(fp, dtype, kv_cache_dtype)


def model_kv_bytes(model_dir, dtype: str, length: int) -> int:
    """The bytes the model's own cache holds for ``length`` tokens: every layer
    dense, except the layers the model windows itself (hybrid models), which
    hold their window."""
    fp = _fingerprint(model_dir)
    windowed = min(length, fp.sliding_window or length) * len(fp.windowed_layers)
    return (len(fp.full_layers) * length + windowed) * _layer_bytes_per_token(fp, dtype)


def _fingerprint(model_dir):
    from transformers import AutoConfig

    return fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir))


def _layer_bytes_per_token(fp, dtype: str, kv_cache_dtype: str = "auto") -> int:
    size = 1 if kv_cache_dtype.startswith("fp8") else {
        "float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    return 2 * fp.num_kv_heads * fp.head_dim * size


def answer_and_measure(llm, prompts: list[str], params,
                       model_bytes) -> tuple[list[str], list[float]]:
    """Greedy answers, and the KV bytes each request held in the engine's block pool
    at its second output token (its first decode step, after the manager freed what
    the spans no longer read; the first token if it stopped there) over
    ``model_bytes(prompt tokens)``, the model's own dense cache of the prompt."""
    from moa_vllm.engine.vllm_surface.entrypoints import llm_scheduler
    from moa_vllm.engine.vllm_surface.kv_manager import request_kv_bytes

    engine, scheduler = llm.llm_engine, llm_scheduler(llm)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    texts, held = [""] * len(prompts), [0.0] * len(prompts)
    with tqdm(total=len(prompts), desc="answers", leave=False) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                i = int(out.request_id)
                if out.finished:
                    texts[i] = out.outputs[0].text
                    bar.update(1)
                elif len(out.outputs[0].token_ids) <= 2:
                    held[i] = (request_kv_bytes(scheduler, out.request_id)
                               / model_bytes(len(out.prompt_token_ids)))
    return texts, held


def effective_length(acc_by_length: dict[int, float], threshold: float = 0.9) -> int:
    """Longest length whose accuracy (and every shorter one's) is >= threshold."""
    best = 0
    for length in sorted(acc_by_length):
        if acc_by_length[length] < threshold:
            break
        best = length
    return best


def fidelity(dense_lps, method_lps) -> tuple[float, float]:
    """Top-1 agreement and KL(dense || method) restricted to the dense top-20."""
    agree, kl, n = 0, 0.0, 0
    for d, m in zip(dense_lps, method_lps):
        if d is None or m is None:
            continue
        d_top = max(d.items(), key=lambda kv: kv[1].logprob)[0]
        m_top = max(m.items(), key=lambda kv: kv[1].logprob)[0]
        agree += d_top == m_top
        floor = min(lp.logprob for lp in m.values())
        for token, lp in d.items():
            p = math.exp(lp.logprob)
            kl += p * (lp.logprob - (m[token].logprob if token in m else floor))
        n += 1
    return agree / max(1, n), kl / max(1, n)


def run_eval(model_dir, methods: list[Method], tasks, lengths, depths, samples: int,
             fidelity_lengths, fidelity_samples: int, out_dir: Path,
             dtype: str = EVAL_DTYPE) -> dict:
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from moa_vllm.engine.vllm_surface.entrypoints import llm_block_size, shutdown_llm

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the block pool is read in process
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_samples(tok, tasks, lengths, depths, samples)
    windows = english_token_windows(tok, fidelity_lengths, fidelity_samples)
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    max_len = min(context, max([*lengths, *fidelity_lengths]) + 256)
    answer = SamplingParams(temperature=0, max_tokens=16)
    model_bytes = functools.partial(model_kv_bytes, model_dir, dtype)
    scoring = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=TOP_K)
    results, dense_logprobs = [], None
    plans_dir = tempfile.TemporaryDirectory(prefix="moa-eval-")  # the methods' plan files
    for method in tqdm(methods, desc="methods", position=0):
        started = time.time()
        res = MethodResult(method.name)
        llm = start_engine(model_dir, method, Path(plans_dir.name), max_len, dtype)
        if method.plan is not None:
            res.densities = {
                d.length: {"average": d.average_density, "allocated": d.allocated_density}
                for d in density_table(method.plan, sorted({*lengths, *fidelity_lengths}),
                                       llm_block_size(llm))}
        texts, held = answer_and_measure(llm, [s.prompt for s in prompts], answer,
                                         model_bytes)
        for length in lengths:
            fractions = [h for s, h in zip(prompts, held) if s.length == length]
            res.kv_fraction[length] = sum(fractions) / len(fractions)
        for task in tasks:
            cells: dict[str, list[bool]] = {}
            fillers: dict[str, list[bool]] = {}
            for s, text in zip(prompts, texts):
                if s.task == task:
                    cells.setdefault(f"{s.length}/{s.depth}", []).append(is_correct(s, text))
                    fillers.setdefault(s.filler, []).append(is_correct(s, text))
            res.accuracy[task] = {k: sum(v) / len(v) for k, v in cells.items()}
            res.accuracy_by_filler[task] = {k: sum(v) / len(v) for k, v in fillers.items()}
            by_length = {n: sum(res.accuracy[task][f"{n}/{d}"] for d in depths) / len(depths)
                         for n in lengths}
            res.effective_length[task] = effective_length(by_length)
        scored = llm.generate([{"prompt_token_ids": ids} for _, ids in windows], scoring,
                              use_tqdm=True)
        lps = [o.prompt_logprobs for o in scored]
        for length in fidelity_lengths:
            idx = [i for i, (n, _) in enumerate(windows) if n == length]
            nll = [-lps[i][p][windows[i][1][p]].logprob
                   for i in idx for p in range(1, len(windows[i][1]))]
            res.perplexity[length] = math.exp(sum(nll) / len(nll))
            if dense_logprobs is not None:
                pairs = [fidelity(dense_logprobs[i][1:], lps[i][1:]) for i in idx]
                res.top1_agreement[length] = sum(a for a, _ in pairs) / len(pairs)
                res.kl_top20[length] = sum(k for _, k in pairs) / len(pairs)
        if method.plan is None and dense_logprobs is None:  # the first dense: the reference
            dense_logprobs = lps
        shutdown_llm(llm)
        res.seconds = time.time() - started
        results.append(res)
    report = {"provenance": provenance(m.path for m in methods),
              "model": str(model_dir), "dtype": dtype, "tasks": list(tasks),
              "lengths": list(lengths), "depths": list(depths), "samples": samples,
              "fidelity_lengths": list(fidelity_lengths),
              "methods": [asdict(r) for r in results]}
    report = json.loads(json.dumps(report))  # the file's form: str keys
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1))
    (out_dir / "eval.md").write_text(markdown(report))
    plot(report, out_dir)
    return report


def markdown(report: dict) -> str:
    lengths = report["lengths"]
    rows = [*provenance_lines(report["provenance"]),
            f"Model `{report['model']}`, {report['dtype']}.", ""]
    head = ("| method | task | " + " | ".join(f"acc@{n}" for n in lengths)
            + " | effective length | " + " | ".join(f"KV@{n}" for n in lengths) + " |")
    rows += [head, "|" + "---|" * (2 * len(lengths) + 3)]
    for m in report["methods"]:
        kv = " | ".join(f"{m['kv_fraction'][str(n)]:.2f}" for n in lengths)
        for task, cells in m["accuracy"].items():
            accs = [sum(v for k, v in cells.items() if k.startswith(f"{n}/"))
                    / len(report["depths"]) for n in lengths]
            rows.append(f"| {m['name']} | {task} | " + " | ".join(f"{a:.2f}" for a in accs)
                        + f" | {m['effective_length'][task]} | {kv} |")
    rows += ["", "KV@n: KV bytes a request held in that engine's block pool at its first "
             "decode step, over the model's own cache of the prompt in the eval's dtype (a "
             "hybrid model's windowed layers windowed; dense > 1: block rounding).", ""]
    fillers = sorted({f for m in report["methods"] for t in m["accuracy_by_filler"].values()
                      for f in t})
    rows += ["| method | task | " + " | ".join(fillers) + " |",
             "|" + "---|" * (len(fillers) + 2)]
    for m in report["methods"]:
        for task, by in m["accuracy_by_filler"].items():
            rows.append(f"| {m['name']} | {task} | "
                        + " | ".join("-" if f not in by else f"{by[f]:.2f}" for f in fillers)
                        + " |")
    flen = report["fidelity_lengths"]
    rows += ["", "| method | " + " | ".join(f"ppl@{n}" for n in flen) + " | "
             + " | ".join(f"top1@{n}" for n in flen) + " | "
             + " | ".join(f"KL20@{n}" for n in flen) + " |",
             "|" + "---|" * (3 * len(flen) + 1)]
    for m in report["methods"]:
        def cell(d, n, fmt):
            v = d.get(str(n), d.get(n))
            return "-" if v is None else fmt.format(v)
        rows.append(f"| {m['name']} | "
                    + " | ".join(cell(m["perplexity"], n, "{:.2f}") for n in flen) + " | "
                    + " | ".join(cell(m["top1_agreement"], n, "{:.3f}") for n in flen) + " | "
                    + " | ".join(cell(m["kl_top20"], n, "{:.4f}") for n in flen) + " |")
    return "\n".join(rows) + "\n"


def plot(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths = report["lengths"], report["depths"]
    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for m in report["methods"]:
            cells = m["accuracy"][task]
            accs = [sum(cells[f"{n}/{d}"] for d in depths) / len(depths) for n in lengths]
            ax.plot(lengths, accs, marker="o", label=m["name"])
        ax.set(title=task, xlabel="prompt tokens", ylabel="accuracy", ylim=(-0.05, 1.05))
        ax.set_xscale("log", base=2)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_vs_length.png", dpi=120)
    plt.close(fig)
    methods = report["methods"]
    fig, axes = plt.subplots(len(tasks), len(methods), squeeze=False,
                             figsize=(2.6 * len(methods), 2.4 * len(tasks)))
    for r, task in enumerate(tasks):
        for c, m in enumerate(methods):
            grid = [[m["accuracy"][task][f"{n}/{d}"] for n in lengths] for d in depths]
            ax = axes[r][c]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [str(d) for d in depths], fontsize=7)
            ax.set_title(f"{m['name']}: {task}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_depth_heatmaps.png", dpi=120)
    plt.close(fig)
