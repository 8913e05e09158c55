"""`moa-vllm plan import` against the MoA authors' published plans (plans/sources/,
MIT): every query head reads at least what the authors' runtime gives it, at chosen
(layer, head, prompt length) points, token by token; the rule per KV head is the
least one that does; the shipped plans are exactly what the import makes; plan
discovery serves them and says which model they were searched on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moa_vllm.plan import PlanError, fingerprint_from_hf_config, load_plan
from moa_vllm.planner.reference_import import import_reference, model_context, source_record
from moa_vllm.span_classes import head_density
from moa_vllm.span_mask import SpanParams, beta_growth, quantize_beta

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "plans" / "sources"
SHIPPED = {
    "meta-llama--Llama-3.2-1B-Instruct": "llama-3.2-1b-instruct-moa-converted.json",
    "meta-llama--Llama-3.2-3B-Instruct": "llama-3.2-3b-instruct-moa-converted.json",
    "gradientai--Llama-3-8B-Instruct-262k": "llama-3-8b-instruct-262k-moa-converted.json",
    "gradientai--Llama-3-70B-Instruct-262k": "llama-3-70b-instruct-262k-moa-converted.json",
    "lmsys--vicuna-7b-v1.5-16k": "vicuna-7b-v1.5-16k-moa-converted.json",
    "lmsys--vicuna-13b-v1.5-16k": "vicuna-13b-v1.5-16k-moa-converted.json",
}


def config(name: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(SOURCES / name / "config.json")


def authors(name: str) -> dict:
    return json.loads((SOURCES / name / "moa_alpha_beta.json").read_text())


def their_band(alpha: float, beta: float, prompt_len):
    """Keys past the 64 sinks an authors' head reads at ``prompt_len`` (int or numpy),
    restated from their code (MoA/attention/cache_utils.py,
    moa_config_to_cache_config): one cache per request, sized at N = prompt + 1024,
    ``ceil64(max(min(int(alpha + N * beta), N), 128))`` tokens, 64 of them sinks."""
    n = np.asarray(prompt_len) + 1024
    cache = np.minimum(np.trunc(alpha + n * beta), n)
    return (np.ceil(np.maximum(cache, 128) / 64) * 64).astype(np.int64) - 64


def their_keys(alpha: float, beta: float, prompt_len: int, t: int) -> set[int]:
    """Keys a query at position ``t`` reads there: decode, a circular buffer of the
    last ``band`` keys; prefill (MoA/kernels/block_sparse_attention_prefill.py), whole
    64-key blocks, from block ``t // 64 + 1 - band / 64`` to its own, causal."""
    band = int(their_band(alpha, beta, prompt_len))
    sinks = set(range(min(64, t + 1)))
    if t >= prompt_len:
        return sinks | set(range(max(0, t - band + 1), t + 1))
    first = max(0, (t // 64 + 1 - band // 64) * 64)
    return sinks | set(range(first, t + 1))


@pytest.fixture(scope="module")
def plans() -> dict:
    return {name: load_plan(ROOT / "plans" / file) for name, file in SHIPPED.items()}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_query_head_reads_what_the_authors_gave_it(name, plans):
    """At chosen (layer, query head, prompt length, query) points: our mask for the
    head's KV head holds every key the authors' head reads, in prefill and decode."""
    plan, ref = plans[name], authors(name)
    context = model_context(config(name))
    group = plan.model.num_attention_heads // plan.model.num_kv_heads
    layers = plan.model.num_layers
    checked = 0
    for i, prompt_len in enumerate([1025, 1100, 2048, 4097, 8191, context]):
        layer = (7 * i + 3) % layers
        spans = plan.layer_spans(layer)
        for head in range(i % group, plan.model.num_attention_heads, group + 1):
            alpha, beta = ref["alphas"][layer][head], ref["betas"][layer][head]
            for t in (prompt_len // 2 + 5, prompt_len - 1, prompt_len, prompt_len + 700):
                keys = torch.arange(t + 1)
                ours = spans.mask(torch.tensor([t]), keys, torch.tensor([prompt_len]))
                read = set(torch.nonzero(ours[head // group, 0]).flatten().tolist())
                missing = their_keys(alpha, beta, prompt_len, t) - read
                assert not missing, (layer, head, prompt_len, t, sorted(missing)[:5])
                checked += 1
    assert checked > 100


@pytest.mark.parametrize("name", ["meta-llama--Llama-3.2-1B-Instruct",
                                  "gradientai--Llama-3-70B-Instruct-262k"])
def test_each_rule_is_the_least_that_covers_its_group(name, plans):
    """One token less of alpha and some member of the group reads less than the
    authors gave it, at some prompt length of the model's context; and the rules
    hold little more than the groups' exact widest windows would: a straight line
    over each envelope, within 0.03 of the cache at 4k-64k."""
    plan, ref = plans[name], authors(name)
    group = plan.model.num_attention_heads // plan.model.num_kv_heads
    excess, heads = {}, {}
    lengths = np.arange(1025, model_context(config(name)) + 1)
    for layer, row in plan.layer_rules()[::5]:
        for kv, (alpha, beta) in enumerate(row):
            members = range(kv * group, (kv + 1) * group)
            widest = np.max([their_band(ref["alphas"][layer][h], ref["betas"][layer][h],
                                        lengths) for h in members], axis=0)
            ours = alpha + beta_growth(quantize_beta(beta), lengths)
            assert (np.maximum(ours, plan.min_window) >= widest).all(), (layer, kv)
            assert (ours - 1 < widest).any(), (layer, kv, alpha, beta)
            for n in (4096, 16384, 65536):
                envelope = head_density(int(widest[n - 1025]), 0.0, n,
                                        SpanParams(64, 1, "prompt", plan.granule))
                rule = head_density(alpha, beta, n, plan.span_params)
                assert envelope <= rule, (layer, kv, n)
                excess[n] = excess.get(n, 0.0) + rule - envelope
                heads[n] = heads.get(n, 0) + 1
    assert all(excess[n] <= 0.03 * heads[n] for n in excess), (excess, heads)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_plans_are_what_the_import_makes(name, plans):
    """Fingerprinted from the published configuration, converted from the source
    file named in the provenance (its digest), labelled converted and not validated."""
    shipped = plans[name]
    hf = config(name)
    source = SOURCES / name / "moa_alpha_beta.json"
    details = shipped.provenance.details
    again = import_reference(authors(name), fingerprint_from_hf_config(hf), model_context(hf),
                             source_record(source, details["source"]["commit"], None))
    assert again.model == shipped.model == fingerprint_from_hf_config(hf)
    assert again.rules == shipped.rules and again.head_classes == shipped.head_classes
    assert details == again.provenance.details
    assert details["source"]["licence"] == "MIT" and len(details["source"]["commit"]) == 40
    assert details["source"]["searched_on"] == name.replace("--", "/")
    assert details["label"] == "converted, not validated by us"
    assert shipped.elastic == "prompt" and shipped.exact_floor == 1024 and shipped.granule == 64


def test_authors_files_are_imported_not_served():
    """Given where a plan goes (``$MOA_PLAN``, ``--additional-config``), the authors'
    file is refused with the command that converts it; the import refuses a model
    it does not fit, in one line."""
    name = "meta-llama--Llama-3.2-1B-Instruct"
    model = fingerprint_from_hf_config(config(name))
    path = SOURCES / name / "moa_alpha_beta.json"
    with pytest.raises(PlanError, match=r"authors' per-query-head format; convert it first: "
                                        r"moa-vllm plan import .*moa_alpha_beta.json"):
        load_plan(path, model)
    wrong = model.model_copy(update={"num_attention_heads": 16, "num_kv_heads": 4})
    with pytest.raises(PlanError, match=r"alphas must be \[16\]\[16\]"):
        import_reference(authors(name), wrong)
    with pytest.raises(PlanError, match="must exceed the exact floor"):
        import_reference(authors(name), model, context=1024)


def test_plan_import_and_show_as_a_user_runs_them(tmp_path, capsys):
    from moa_vllm.cli import main

    name = "lmsys--vicuna-7b-v1.5-16k"
    out = tmp_path / "vicuna.json"
    assert main(["plan", "import", str(SOURCES / name / "moa_alpha_beta.json"),
                 "--model", str(SOURCES / name / "config.json"), "--out", str(out),
                 "--commit", "0" * 40]) == 0
    printed = capsys.readouterr().out
    assert "lmsys/vicuna-7b-v1.5-16k (converted, not validated by us)" in printed
    assert "at  16384 tokens" in printed  # the context, 4096 positions x linear RoPE 4
    assert load_plan(out).provenance.details["fit_lengths"] == [1025, 16384]
    name = "meta-llama--Llama-3.2-1B-Instruct"
    assert main(["plan", "show", str(ROOT / "plans" / SHIPPED[name]),
                 "--lengths", "4096,16384,65536,131072"]) == 0
    report = json.loads(capsys.readouterr().out)
    authors_density = report["authors_density"]
    assert "4x the model's own GQA cache" in authors_density["note"]
    rows = authors_density["lengths"]
    assert [r["length"] for r in rows] == [4096, 16384, 65536, 131072]
    for row, density in zip(rows, report["densities"]):
        assert row["nominal_of_model_cache"] == pytest.approx(4 * row["nominal_density"])
        assert row["allocated_density"] == density["allocated_density"]
        # their MHA cache holds almost twice the model's dense cache; ours less than it
        assert row["allocated_density"] < 0.8 < 1.7 < row["nominal_of_model_cache"]


@pytest.mark.parametrize("name, positions", [
    ("meta-llama--Llama-3.2-1B-Instruct", None),
    ("gradientai--Llama-3-8B-Instruct-262k", 131072),  # Llama-3.1-8B-Instruct's shape
    ("lmsys--vicuna-7b-v1.5-16k", None),  # Llama-2-7B's fingerprint too
])
def test_discovery_serves_them_and_names_the_model_they_were_searched_on(
        name, positions, tmp_path, monkeypatch):
    from moa_vllm.plan_discovery import resolve_plan

    monkeypatch.delenv("MOA_PLAN", raising=False)
    monkeypatch.delenv("MOA_PLANS_DIR", raising=False)
    model = fingerprint_from_hf_config(config(name))
    if positions:  # another model of the same shape gets the plan, and is told so
        model = model.model_copy(update={"max_position_embeddings": positions})
    found = resolve_plan(tmp_path, model)
    assert Path(found.source).name == SHIPPED[name]
    assert found.how == ("shipped plans (fingerprint match); the MoA authors' plan searched "
                         f"on {name.replace('--', '/')}, converted, not validated by us")
