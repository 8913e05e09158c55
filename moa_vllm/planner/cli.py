"""`moa-vllm plan search` (the automatic plan pipeline): its options are the fields
of ``SearchConfig``, read from the dataclass. `moa-vllm plan import`: the MoA
authors' published plans (``reference_import``)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path


def _parser_type(hint):
    """argparse ``type`` of a ``SearchConfig`` field: ``X | None`` reads as ``X``,
    ``list[X]`` as comma-separated values."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return lambda text: [item(x) for x in text.split(",") if x]
    return hint


def cmd_plan_search(args) -> None:
    import logging

    from moa_vllm.planner.pipeline import run_search
    from moa_vllm.planner.search_config import SearchConfig

    logging.basicConfig(level=logging.INFO, format="[plan search] %(message)s")
    names = [f.name for f in dataclasses.fields(SearchConfig)]
    cfg = SearchConfig(**{name: getattr(args, name) for name in names})
    plan = run_search(cfg)
    d = plan.provenance.details
    print(f"wrote {cfg.out} at density {d['density']} in {d['total_seconds']} s")
    for n, v in d["validation"]["per_length"].items():
        print(f"  validation loss at {n} tokens: {v['chosen_loss']:.4f} (uniform window "
              f"{v['uniform_loss']:.4f}, dense {v['dense_loss']:.4f})")
    r = d["retrieval"]
    for step in r["sweep"]:
        window = (f" (its uniform window: {step['uniform_solved']})"
                  if "uniform_solved" in step else "")
        print(f"  density {step['density']}: recalls {step['solved']} of the "
              f"{r['dense_solved']} prompts dense recalls{window}, of {r['prompts']} at "
              f"{r['lengths']} tokens")


def add_search_parser(plan_subparsers) -> None:
    """Adds `plan search` to the `moa-vllm plan` sub-commands."""
    from moa_vllm.planner.search_config import SearchConfig

    p = plan_subparsers.add_parser(
        "search", help="calibrate, profile, optimise (MILP) and validate a MoA plan")
    hints = typing.get_type_hints(SearchConfig)
    for f in dataclasses.fields(SearchConfig):
        meta = dict(f.metadata)
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        if hints[f.name] is bool:  # a switch that turns a default-on option off
            p.add_argument(flag, dest=f.name, action="store_false", **meta)
            continue
        if f.default is not dataclasses.MISSING:
            meta["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            meta["default"] = f.default_factory()
        else:
            meta["required"] = True
        if "type" not in meta:  # a field with its own parser keeps it
            meta["type"] = _parser_type(hints[f.name])
        p.add_argument(flag, dest=f.name, **meta)
    p.set_defaults(func=cmd_plan_search)


def cmd_plan_import(args) -> None:
    from transformers import AutoConfig

    from moa_vllm.plan import PlanError, fingerprint_from_hf_config
    from moa_vllm.plan_report import reference_comparison
    from moa_vllm.planner.reference_import import (
        LABEL,
        import_reference,
        model_context,
        source_record,
    )

    path = Path(args.source)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"{path}: cannot read the authors' plan ({err})") from None
    hf_config = AutoConfig.from_pretrained(args.model)
    context = args.context or model_context(hf_config)
    plan = import_reference(data, fingerprint_from_hf_config(hf_config), context,
                            source_record(path, args.commit, args.searched_on),
                            args.max_head_classes)
    plan.save(args.out)
    searched_on = plan.provenance.details["source"]["searched_on"]
    print(f"wrote {args.out}: the MoA authors' plan for {searched_on} ({LABEL}), "
          f"{len({r for _, row in plan.layer_rules() for r in row})} distinct rules, "
          f"prompt-elastic, exact up to {plan.exact_floor} tokens")
    for row in reference_comparison(plan, [4096, 16384, 65536], args.block_size):
        print(f"  at {row['length']:>6} tokens: {row['allocated_density']:.3f} of vLLM's "
              f"cache; the authors' nominal {row['nominal_density']:.3f} of their "
              f"MHA-expanded cache = {row['nominal_of_model_cache']:.3f} of the model's own")


def add_import_parser(plan_subparsers) -> None:
    """Adds `plan import` to the `moa-vllm plan` sub-commands."""
    from moa_vllm.plan_report import DEFAULT_BLOCK_SIZE
    from moa_vllm.planner.reference_import import MAX_HEAD_CLASSES

    p = plan_subparsers.add_parser(
        "import", help="convert one of the MoA authors' published plans (thu-nics/MoA, "
                       "moa_alpha_beta.json) to a per-KV-head plan for a model")
    p.add_argument("source", help="the authors' moa_alpha_beta.json")
    p.add_argument("--model", required=True,
                   help="the model's directory (or its config.json): the fingerprint")
    p.add_argument("--out", required=True)
    p.add_argument("--commit", help="the authors' commit the file is from (provenance)")
    p.add_argument("--searched-on", help="the model the authors searched it on (default: "
                   "from their examples/<org>--<name>/ folder name)")
    p.add_argument("--context", type=int, help="longest prompt the rules must cover "
                   "(default: the model's context, linear RoPE scaling included)")
    p.add_argument("--max-head-classes", type=int, default=MAX_HEAD_CLASSES,
                   help="head classes at most (KV-cache groups)")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help="block size of the densities printed")
    p.set_defaults(func=cmd_plan_import)
