import pytest

from moa_vllm.plan import ModelFingerprint, PlanError, uniform_plan
from moa_vllm.plan_discovery import MODEL_DIR_PLAN, resolve_plan

FP = ModelFingerprint(
    architecture="LlamaForCausalLM", num_layers=2, num_attention_heads=4,
    num_kv_heads=2, head_dim=32, max_position_embeddings=1024,
)
OTHER = FP.model_copy(update={"num_layers": 3})


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    model_dir, plans_dir = tmp_path / "model", tmp_path / "plans"
    model_dir.mkdir()
    plans_dir.mkdir()
    monkeypatch.setenv("MOA_PLANS_DIR", str(plans_dir))
    monkeypatch.delenv("MOA_PLAN", raising=False)
    return model_dir, plans_dir


def test_order_env_then_model_dir_then_shipped(dirs, tmp_path, monkeypatch):
    model_dir, plans_dir = dirs
    uniform_plan(FP, 0.5).save(plans_dir / "shipped.json")
    uniform_plan(OTHER, 0.5).save(plans_dir / "other-model.json")
    assert resolve_plan(model_dir, FP).source.endswith("shipped.json")
    uniform_plan(FP, 0.25).save(model_dir / MODEL_DIR_PLAN)
    assert resolve_plan(model_dir, FP).how == "model directory"
    uniform_plan(FP, 1.0).save(tmp_path / "env.json")
    monkeypatch.setenv("MOA_PLAN", str(tmp_path / "env.json"))
    assert resolve_plan(model_dir, FP).how == "$MOA_PLAN"


def test_mismatch_names_both_shapes(dirs, tmp_path, monkeypatch):
    model_dir, _ = dirs
    uniform_plan(OTHER, 0.5).save(tmp_path / "wrong.json")
    monkeypatch.setenv("MOA_PLAN", str(tmp_path / "wrong.json"))
    with pytest.raises(PlanError) as err:
        resolve_plan(model_dir, FP)
    assert "plan is for LlamaForCausalLM with 3 layers" in str(err.value)
    assert "but the model is LlamaForCausalLM with 2 layers" in str(err.value)


def test_no_plan_says_how_to_make_one(dirs):
    model_dir, _ = dirs
    with pytest.raises(PlanError, match="no MoA plan for .*moa-vllm plan uniform"):
        resolve_plan(model_dir, OTHER.model_copy(update={"num_layers": 7}))


def test_of_several_shipped_plans_the_best_searched_one_serves(dirs):
    model_dir, plans_dir = dirs
    uniform_plan(FP, 0.9).save(plans_dir / "a-uniform.json")
    for name, density, loss in (("b-0.25", 0.25, 0.5), ("c-0.5", 0.5, 0.9), ("d-0.5", 0.5, 0.8)):
        plan = uniform_plan(FP, density)
        plan.provenance.method = "moa-search"
        plan.provenance.details = {"density": density, "validation": {"loss_vs_uniform": loss}}
        plan.save(plans_dir / f"{name}.json")
    found = resolve_plan(model_dir, FP)
    assert found.source.endswith("d-0.5.json")
    assert "also matching: c-0.5.json, b-0.25.json, a-uniform.json" in found.how
