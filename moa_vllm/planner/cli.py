"""`moa-vllm plan search` (the automatic plan pipeline)."""

from __future__ import annotations


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def cmd_plan_search(args) -> None:
    import logging

    from moa_vllm.planner.pipeline import SearchConfig, run_search

    logging.basicConfig(level=logging.INFO, format="[plan search] %(message)s")
    cfg = SearchConfig(
        model=args.model, density=args.density, out=args.out, lengths=args.lengths,
        validate_length=args.validate_length or None, density_lengths=args.density_lengths,
        allocated_density=args.allocated_density, elastic=args.elastic,
        max_span_classes=args.max_span_classes, block_size=args.block_size,
        sink_tokens=args.sink_tokens, min_window=args.min_window, profile_block=args.profile_block,
        samples=args.samples, validate_samples=args.validate_samples,
        answer_tokens=args.answer_tokens, dataset=args.dataset, seed=args.seed, rules=args.rules,
        max_rules_per_layer=args.max_rules_per_layer, pareto_grid=args.pareto_grid,
        max_validate=args.max_validate, time_limit=args.time_limit, mip_rel_gap=args.mip_gap,
        threads=args.threads, work_dir=args.work_dir, progress=not args.no_progress,
    )
    plan = run_search(cfg)
    d = plan.provenance.details
    v = d["validation"]
    print(f"wrote {args.out}: validation loss {v['chosen_loss']} (uniform window "
          f"{v['uniform_loss']}, dense {v['dense_loss']}), {d['total_seconds']} s")


def add_search_parser(plan_subparsers) -> None:
    """Adds `plan search` to the `moa-vllm plan` sub-commands."""
    p = plan_subparsers.add_parser(
        "search", help="calibrate, profile, optimise (MILP) and validate a MoA plan")
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--density", type=float, required=True,
                   help="KV density budget (average and allocated) at every length of interest")
    p.add_argument("--allocated-density", type=float,
                   help="budget of the runtime's allocated density, the KV blocks vLLM holds "
                        "(default: --density; 1.0 frees each KV head from its layer class: "
                        "per-head plans that keep retrieval heads wide)")
    p.add_argument("--lengths", type=_ints, default=[2048, 4096, 8192], help="profiling lengths")
    p.add_argument("--validate-length", type=int, default=12288, help="unseen validation length (0: none)")
    p.add_argument("--density-lengths", type=_ints,
                   help="lengths the densities are constrained at (default: profiling lengths, "
                        "validation length and max_position_embeddings)")
    p.add_argument("--elastic", choices=["position", "prompt"], default="prompt",
                   help="prompt: N = prompt length, every prompt query keeps the whole span "
                        "(better accuracy at equal density; prefix caching off); position: "
                        "N = t + 1 (prefix caching stays on)")
    p.add_argument("--max-span-classes", type=int, default=4)
    p.add_argument("--block-size", type=int, default=16, help="runtime KV block size")
    p.add_argument("--sink-tokens", type=int, default=64)
    p.add_argument("--min-window", type=int, default=64)
    p.add_argument("--profile-block", type=int, default=64, help="importance tile size")
    p.add_argument("--samples", type=_ints, help="calibration samples per profiling length "
                   "(default: about 16k tokens per length)")
    p.add_argument("--validate-samples", type=int, default=2)
    p.add_argument("--answer-tokens", type=int, default=64, help="dense answer tokens (targets)")
    p.add_argument("--dataset", help='JSONL of {"prompt","answer"}, {"prompt"} or {"text"}')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rules", help='rule grid "alpha:beta,..." (default: ~48 rules scaled to the context)')
    p.add_argument("--max-rules-per-layer", type=int, default=2)
    p.add_argument("--pareto-grid", type=int, default=2, help="epsilon levels per secondary length")
    p.add_argument("--max-validate", type=int, default=6, help="Pareto plans scored at the validation length")
    p.add_argument("--time-limit", type=float, default=30.0, help="seconds per MILP solve")
    p.add_argument("--mip-gap", type=float, default=5e-3)
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--work-dir", help="stage cache (default: ~/.cache/moa-vllm/plan-search)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_plan_search)
