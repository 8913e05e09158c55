"""`moa-vllm plan search` (the automatic plan pipeline)."""

from __future__ import annotations


def add_search_parser(plan_subparsers) -> None:
    """Adds `plan search` to the `moa-vllm plan` sub-commands."""
