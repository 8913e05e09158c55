"""`moa-vllm plan search` (the automatic plan pipeline): its options are the fields
of ``SearchConfig``, read from the dataclass."""

from __future__ import annotations

import dataclasses
import types
import typing


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _parser_type(hint):
    """argparse ``type`` of a ``SearchConfig`` field: ``X | None`` reads as ``X``,
    ``list[int]`` as comma-separated integers."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return _ints if typing.get_origin(hint) is list else hint


def cmd_plan_search(args) -> None:
    import logging

    from moa_vllm.planner.pipeline import SearchConfig, run_search

    logging.basicConfig(level=logging.INFO, format="[plan search] %(message)s")
    names = [f.name for f in dataclasses.fields(SearchConfig)]
    cfg = SearchConfig(**{name: getattr(args, name) for name in names})
    plan = run_search(cfg)
    d = plan.provenance.details
    print(f"wrote {cfg.out} in {d['total_seconds']} s")
    for n, v in d["validation"]["per_length"].items():
        print(f"  validation loss at {n} tokens: {v['chosen_loss']:.4f} (uniform window "
              f"{v['uniform_loss']:.4f}, dense {v['dense_loss']:.4f})")


def add_search_parser(plan_subparsers) -> None:
    """Adds `plan search` to the `moa-vllm plan` sub-commands."""
    from moa_vllm.planner.pipeline import SearchConfig

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
        meta.setdefault("type", _parser_type(hints[f.name]))
        p.add_argument(flag, dest=f.name, **meta)
    p.set_defaults(func=cmd_plan_search)
