import json
import math

import pytest

from moa_vllm.plan import (
    ModelFingerprint,
    PlanError,
    load_plan,
    plan_from_dict,
    uniform_plan,
)

FP = ModelFingerprint(
    architecture="LlamaForCausalLM", num_layers=2, num_attention_heads=4,
    num_kv_heads=2, head_dim=32, max_position_embeddings=1024,
)


def good() -> dict:
    return json.loads(uniform_plan(FP, 0.5).model_dump_json())


def test_roundtrip(tmp_path):
    plan = uniform_plan(FP, 0.5, length=512, sink_tokens=16)
    plan.save(tmp_path / "p.json")
    again = load_plan(tmp_path / "p.json")
    assert again == plan
    assert again.rules[0][0] == (512 // 2 - 16, 0.0)


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: d["rules"].pop(), "rules must be [num_layers=2]"),
        (lambda d: d["rules"][1].append([1, 0.0]), "rules must be"),
        (lambda d: d["rules"][0].__setitem__(1, [4, math.nan]), "rules[0][1]: beta"),
        (lambda d: d["rules"][1].__setitem__(0, [4, 1.5]), "rules[1][0]: beta"),
        (lambda d: d["rules"][1].__setitem__(0, [4, -0.1]), "rules[1][0]: beta"),
        (lambda d: d.__setitem__("sink_tokens", -1), "sink_tokens"),
        (lambda d: d.__setitem__("min_window", 0), "min_window"),
        (lambda d: d.__setitem__("granule", 0), "granule"),
        (lambda d: d.__setitem__("granule", 48), "sink_tokens (64) must be a multiple of the granule (48)"),
        (lambda d: d.__setitem__("version", 2), "unsupported plan version 2"),
        (lambda d: d.__setitem__("elastic", "sometimes"), "elastic"),
        (lambda d: d.__setitem__("colour", "red"), "colour"),
        (lambda d: d["rules"][0].__setitem__(0, ["wide", 0.0]), "rules.0.0.0"),
    ],
)
def test_bad_plans_say_what_and_where(mutate, where):
    data = good()
    mutate(data)
    with pytest.raises(PlanError) as err:
        plan_from_dict(data, "p.json")
    message = str(err.value)
    assert message.startswith("p.json: ")
    assert where in message
    assert "\n" not in message


def test_plans_without_a_granule_are_token_exact():
    data = good()
    del data["granule"]
    plan = plan_from_dict(data, "old.json")
    assert plan.granule == 1 and plan.layer_spans(0).params.granule == 1


def test_nan_in_json_file(tmp_path):
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(good()).replace("0.0]", "NaN]", 1))
    with pytest.raises(PlanError, match="beta must be a number"):
        load_plan(path)


def test_unreadable_and_not_json(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(tmp_path / "x.json")


def test_uniform_density_bounds():
    with pytest.raises(PlanError, match="density"):
        uniform_plan(FP, 0.0)
    full = uniform_plan(FP, 1.0)
    assert full.rules[0][0][0] >= FP.max_position_embeddings


@pytest.mark.parametrize("elastic", ["prompt", "position"])
def test_growing_uniform_plan_has_its_density_at_every_length(elastic):
    from moa_vllm.span_classes import average_density

    plan = uniform_plan(FP, 0.25, sink_tokens=16, min_window=16, elastic=elastic, grow=True)
    fixed = uniform_plan(FP, 0.25, length=256, sink_tokens=16, min_window=16)
    for n in (256, 512, 1024):
        assert average_density(plan, n) == pytest.approx(0.25, abs=1 / n)
    assert average_density(fixed, 1024) < 0.1 and average_density(fixed, 256) == pytest.approx(0.25, abs=1 / 256)


# -- hybrid models: the model windows some layers itself -----------------------------

HYBRID = ModelFingerprint(
    architecture="Gemma3ForCausalLM", num_layers=4, num_attention_heads=4, num_kv_heads=1,
    head_dim=32, max_position_embeddings=4096, windowed_layers=[0, 1, 3], sliding_window=512,
)


def test_hybrid_plans_have_rules_for_the_full_layers_only(tmp_path):
    plan = uniform_plan(HYBRID, 0.5, length=2048, sink_tokens=16)
    assert [row is None for row in plan.rules] == [True, True, False, True]
    assert [layer for layer, _ in plan.layer_rules()] == [2]
    plan.save(tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json") == plan
    assert '"rules": [\n  null,\n  null,\n  [[' in (tmp_path / "p.json").read_text()
    with pytest.raises(ValueError, match="layer 0 is windowed by the model"):
        plan.layer_spans(0)
    window = plan.mask_spans(0)  # the model's own window in the references
    assert window.alpha.tolist() == [512] and window.params.sink_tokens == 0


@pytest.mark.parametrize("mutate", [
    lambda d: d["rules"].__setitem__(2, None),  # a full layer without rules
    lambda d: d["rules"].__setitem__(0, [[64, 0.0]]),  # a windowed layer with rules
    lambda d: d["model"].__setitem__("windowed_layers", [0, 1]),
])
def test_hybrid_rules_must_be_null_exactly_at_the_windowed_layers(mutate):
    data = json.loads(uniform_plan(HYBRID, 0.5).model_dump_json())
    mutate(data)
    with pytest.raises(PlanError, match=r"rules must be \[num_layers=4\]\[num_kv_heads=1\] "
                       r"with null rows exactly at the model's windowed layers"):
        plan_from_dict(data, "p.json")


@pytest.mark.parametrize("fields, where", [
    ({"windowed_layers": [1, 0], "sliding_window": 8}, "windowed_layers must be distinct"),
    ({"windowed_layers": [4], "sliding_window": 8}, "below 4"),
    ({"windowed_layers": [1]}, "windowed_layers and sliding_window go together"),
])
def test_bad_windowed_layers(fields, where):
    data = {**FP.model_dump(), "num_layers": 4, **fields}
    with pytest.raises(ValueError, match=where):
        ModelFingerprint(**data)


def test_a_plan_for_a_hybrid_model_does_not_fit_its_full_attention_twin():
    from moa_vllm.plan import check_plan_fits

    twin = ModelFingerprint(**{**HYBRID.model_dump(), "windowed_layers": [],
                               "sliding_window": None})
    with pytest.raises(PlanError, match="3 of them windowed to 512 tokens by the model"):
        check_plan_fits(uniform_plan(HYBRID, 0.5), twin, "p.json")
