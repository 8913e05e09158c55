"""Peak memory and time of plan-search profiling (one sample, one forward and one
backward that recomputes and profiles a layer at a time), per layer count and
length, on a model shape with random weights, beside ``planner.cost``'s estimate.
The difference between two layer counts is what one more layer costs; a full
model extrapolates from it.

    python benchmarks/planner_memory.py --shape llama3-8b --layers 1,2 --vocab 32000 \\
        --lengths 4096,8192,16384 --dtype bfloat16 --out benchmarks/results/planner_memory_cpu

Peak is over what was resident before profiling (weights, model): on CPU the
process's peak RSS (``/proc/self/status`` VmHWM, reset through ``clear_refs``), on
CUDA ``torch.cuda.max_memory_allocated``. Every measurement runs in a fresh
process (``CHILD_ENV``), so no allocator keeps a previous run's memory. Its
smoke (tests/planner/test_planner_cost.py) runs the tiny model's directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moa_vllm.evaluation.machine import provenance, provenance_lines  # noqa: E402
from moa_vllm.evaluation.served import markdown_table  # noqa: E402

# Llama-3-8B (meta-llama/Meta-Llama-3-8B's config.json); vocab shrunk by --vocab
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=14336, num_hidden_layers=32,
                      max_position_embeddings=8192, vocab_size=128256,
                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}
ANSWER_TOKENS = 64
# glibc returns every allocation of 64 KiB or more to the system when it is freed, so
# the peak RSS follows the live tensors (by default it keeps freed chunks of up to
# 32 MiB: 1 vs 5 layers of a small shape then differed by 12x what one layer holds)
CHILD_ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


def full_config(shape: str):
    """A named shape (``SHAPES``), or a model directory's config."""
    from transformers import AutoConfig, LlamaConfig

    if shape in SHAPES:
        return LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    return AutoConfig.from_pretrained(shape)


def shape_config(shape: str, layers: int, vocab: int | None):
    """``shape`` cut to its first ``layers`` layers, with ``vocab`` tokens if given."""
    config = full_config(shape)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    if vocab:
        config.vocab_size = vocab
    return config


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure_one(shape: str, layers: int, length: int, vocab: int | None, device: str,
                dtype: str, threads: int) -> dict:
    """Profile one random sample of ``length`` tokens on a random model (this process)."""
    import torch
    from transformers import AutoModelForCausalLM

    from moa_vllm.planner import profile as P

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    P.register()
    config = shape_config(shape, layers, vocab)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype),
                                             attn_implementation=P.ATTN_NAME)
    model = model.to(device).eval().requires_grad_(False)
    ids = torch.randint(100, config.vocab_size, (length,)).tolist()
    # first use (thread pools, kernels' caches) outside the measurement
    P.profile_sample(model, ids[:2 * ANSWER_TOKENS], ANSWER_TOKENS, 64, 2 * ANSWER_TOKENS)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _status_kib("VmRSS") << 10
    t0 = time.perf_counter()
    P.profile_sample(model, ids, length - ANSWER_TOKENS, 64, length)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") << 10) - base
    return {"layers": layers, "length": length, "peak_bytes": peak, "seconds": round(seconds, 2)}


def with_estimate(row: dict, shape: str, vocab: int | None, dtype: str) -> dict:
    """The row and ``planner.cost``'s estimate of it (over the weights, as measured)."""
    import torch

    from moa_vllm.planner.cost import ModelShape, profile_bytes

    parts = profile_bytes(ModelShape.from_hf_config(shape_config(shape, row["layers"], vocab)),
                          row["length"], torch.empty(0, dtype=getattr(torch, dtype)).element_size(),
                          ANSWER_TOKENS)
    return {**row, "estimated_bytes": sum(parts.values()) - parts["weights"],
            "estimated_parts": parts}


def per_layer(rows: list[dict], full_layers: int) -> list[dict]:
    """What one more layer costs at each length (two layer counts), and the full
    model extrapolated from it (labelled as such wherever it is shown)."""
    out = []
    for length in sorted({r["length"] for r in rows}):
        at = sorted((r for r in rows if r["length"] == length), key=lambda r: r["layers"])
        if len(at) < 2:
            continue
        lo, hi = at[0], at[-1]
        n = hi["layers"] - lo["layers"]
        d_bytes = (hi["peak_bytes"] - lo["peak_bytes"]) / n
        d_secs = (hi["seconds"] - lo["seconds"]) / n
        out.append({"length": length, "layer_bytes": d_bytes, "layer_seconds": d_secs,
                    "full_bytes": lo["peak_bytes"] + (full_layers - lo["layers"]) * d_bytes,
                    "full_seconds": lo["seconds"] + (full_layers - lo["layers"]) * d_secs})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3-8b",
                    help=f"{', '.join(SHAPES)}, or a model directory (its config)")
    ap.add_argument("--layers", default="1,2", help="layer counts (comma-separated)")
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--vocab", type=int,
                    help="vocabulary (shrink it: only the answer's logits depend on it)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.one:
        print(json.dumps(measure_one(args.shape, layers[0], lengths[0], args.vocab, args.device,
                                     args.dtype, args.threads)))
        return
    rows = []
    for length in lengths:
        for n in layers:
            child = [sys.executable, "-P", __file__, "--one", "--shape", args.shape,
                     "--layers", str(n), "--lengths", str(length), "--device", args.device,
                     "--dtype", args.dtype, "--threads", str(args.threads), "--out", args.out]
            if args.vocab:
                child += ["--vocab", str(args.vocab)]
            res = subprocess.run(child, capture_output=True, text=True, check=True, env=CHILD_ENV)
            rows.append(with_estimate(json.loads(res.stdout.strip().splitlines()[-1]), args.shape,
                                      args.vocab, args.dtype))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "estimated_parts"}),
                  flush=True)
    write(Path(args.out), {"provenance": provenance(), "shape": args.shape, "vocab": args.vocab,
                           "device": args.device, "dtype": args.dtype, "threads": args.threads,
                           "answer_tokens": ANSWER_TOKENS, "load_average": os.getloadavg(),
                           "rows": rows})


def write(out: Path, result: dict) -> None:
    """OUT.json, and OUT.md with the per-layer step and the extrapolation."""
    full = full_config(result["shape"]).num_hidden_layers
    result["per_layer"] = per_layer(result["rows"], full)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    gib = [dict(r, peak=r["peak_bytes"] / 2**30, estimated=r["estimated_bytes"] / 2**30)
           for r in result["rows"]]
    layer_gib = [dict(r, layer=r["layer_bytes"] / 2**30, full=r["full_bytes"] / 2**30)
                 for r in result["per_layer"]]
    lines = [*provenance_lines(result["provenance"]), "",
             f"Shape `{result['shape']}` (vocab {result['vocab'] or 'as is'}), random weights, "
             f"{result['dtype']} on {result['device']}, {result['threads']} threads, one sample "
             f"with {result['answer_tokens']} answer tokens; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in result['load_average'])}.", "",
             *markdown_table(gib, [("layers", "layers", "d"), ("tokens", "length", "d"),
                                   ("peak GiB (over weights)", "peak", ".2f"),
                                   ("estimate GiB", "estimated", ".2f"),
                                   ("seconds", "seconds", ".1f")]), "",
             f"One more layer, and a {full}-layer model **extrapolated** from it "
             "(the fewest layers' peak and time plus that much per further layer):", "",
             *markdown_table(layer_gib, [("tokens", "length", "d"),
                                         ("per layer GiB", "layer", ".3f"),
                                         ("per layer s", "layer_seconds", ".1f"),
                                         (f"{full} layers GiB (extrapolated)", "full", ".2f"),
                                         (f"{full} layers s (extrapolated)", "full_seconds",
                                          ".0f")])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
