"""The verification policy: which thresholds reach which stage, where each came from, and that a
recipe read back from its own dump is held to the same thresholds and keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import Pipeline
from pipeline.errors import RecipeError
from pipeline.recipe import Recipe, load_recipe, parse_recipe
from pipeline.verify.policy import DEFAULTS, PRECISION_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _with_precision_verify(tmp_path: Path, source: str, verify: str) -> Path:
    """A copy of a shipped recipe (model path made absolute) with a `verify:` on its precision stage."""
    text = (ROOT / "recipes" / source).read_text().replace("../models/", f"{ROOT}/models/")
    marker = "  - type: precision\n"
    assert marker in text
    head, _, tail = text.partition(marker)
    lines = tail.splitlines(keepends=True)
    i = next(n for n, line in enumerate(lines) if line.startswith("  - type:"))
    out = tmp_path / source
    out.write_text(head + marker + "".join(lines[:i]) + f"    verify: {verify}\n" + "".join(lines[i:]))
    return out


def _keys(recipe: Path, cache: Path) -> dict[str, str]:
    return {p.name: p.key for p in Pipeline.from_recipe(recipe, cache_dir=cache).plan()}


def test_a_later_stages_verify_does_not_change_earlier_keys(tmp_path):
    """Defect: precision's verify section reached the quantize key, so GPTQ ran again for nothing."""
    plain = tmp_path / "plain"
    plain.mkdir()
    base = _keys(_with_precision_verify(plain, "tiny-llama-gptq-w4.yaml", "{}"), tmp_path / "cache")
    changed = _keys(_with_precision_verify(tmp_path, "tiny-llama-gptq-w4.yaml", "{max_kl_mean: 0.5}"),
                    tmp_path / "cache")
    for stage in ("load", "quantize", "export", "simplify"):
        assert base[stage] == changed[stage], f"{stage}'s key changed with precision's verify section"
    for stage in ("precision", "engine"):
        assert base[stage] != changed[stage], f"{stage} is gated by the new threshold: its key must change"


def test_quantize_gates_are_its_own():
    recipe = load_recipe(ROOT / "recipes" / "tiny-llama-gptq-w4.yaml").recipe
    gates = recipe.stage("quantize").gates()
    assert set(gates.values()) == {"max_kl_mean", "min_top1_agreement", "max_perplexity_increase"}
    assert all(t["source"] == "default (4-bit weights)" for t in gates.to_dict().values())


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_a_dumped_recipe_reads_back_to_the_same_thresholds(path, tmp_path):
    """Defect: overrides were read from pydantic's model_fields_set, which a dump and validate marks all
    set, so the package manifest's resolved recipe read back with thresholds turned into None."""
    recipe = load_recipe(path).recipe
    again = Recipe.model_validate(recipe.model_dump(mode="json"))
    assert again == recipe
    for spec in recipe.stages:
        if spec.type == "quantize":
            assert again.stage("quantize").gates() == spec.gates()
        else:
            assert again.policy_for(spec.type) == recipe.policy_for(spec.type), spec.type


def test_a_stage_override_survives_the_round_trip():
    text = (ROOT / "recipes" / "tiny-llama-int8-dynamic.yaml").read_text().replace(
        "    mode: int8-dynamic\n", "    mode: int8-dynamic\n    verify: {max_kl_mean: 0.5, prefill_atol: null}\n")
    recipe = parse_recipe(text, "r.yaml")
    again = Recipe.model_validate(recipe.model_dump(mode="json"))
    for r in (recipe, again):
        policy = r.policy_for("engine")
        assert policy.max_kl_mean == 0.5 and policy.min_top1_agreement == 0.85
        assert policy.prefill_atol is None
        assert policy.to_dict()["max_kl_mean"]["source"] == "stages.precision.verify"
        assert policy.to_dict()["min_top1_agreement"]["source"] == "stages.precision default (mode int8-dynamic)"
        assert r.policy_for("export").max_kl_mean is None  # an override holds from its stage on, not before


def test_a_null_where_a_threshold_cannot_be_off_is_refused_at_stage_level():
    """Defect: model_copy(update=...) skipped validation, so min_greedy_match: null on a stage was accepted
    and raised a TypeError deep in verification."""
    text = (ROOT / "recipes" / "tiny-llama-int8-dynamic.yaml").read_text().replace(
        "    mode: int8-dynamic\n", "    mode: int8-dynamic\n    verify: {min_greedy_match: null}\n")
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: field 'stages.2.verify.min_greedy_match'"):
        parse_recipe(text, "r.yaml")


def test_user_thresholds_beat_stage_defaults():
    """Defect: a top-level max_kl_mean of 0.001 became the precision mode's 0.05."""
    text = (ROOT / "recipes" / "tiny-llama-int8-dynamic.yaml").read_text().replace(
        "verify:\n", "verify:\n  max_kl_mean: 0.001\n")
    recipe = parse_recipe(text, "r.yaml")
    for stage in ("precision", "engine"):
        t = recipe.policy_for(stage).to_dict()
        assert t["max_kl_mean"] == {"value": 0.001, "source": "verify"}
        assert t["min_top1_agreement"] == {"value": PRECISION_DEFAULTS["int8-dynamic"]["min_top1_agreement"],
                                           "source": "stages.precision default (mode int8-dynamic)"}
    export = recipe.policy_for("export").to_dict()
    assert export["max_kl_mean"] == {"value": 0.001, "source": "verify"}
    assert export["prefill_atol"] == {"value": DEFAULTS["prefill_atol"], "source": "default"}


def test_a_stage_override_beats_the_top_level():
    text = (ROOT / "recipes" / "tiny-llama-int8-dynamic.yaml").read_text().replace(
        "verify:\n", "verify:\n  max_kl_mean: 0.001\n").replace(
        "    mode: int8-dynamic\n", "    mode: int8-dynamic\n    verify: {max_kl_mean: 0.2}\n")
    policy = parse_recipe(text, "r.yaml").policy_for("engine").to_dict()
    assert policy["max_kl_mean"] == {"value": 0.2, "source": "stages.precision.verify"}


@pytest.mark.slow
def test_every_stage_reports_its_effective_thresholds(shipped_run):
    result, _ = shipped_run
    for stage in result.stages:
        thresholds = stage.verify["thresholds"]
        if stage.name == "load":
            assert thresholds == {}
            continue
        assert thresholds["prefill_atol"] == {"value": 1e-4, "source": "verify"}, stage.name  # the recipe sets it
        assert thresholds["min_greedy_match"] == {"value": 1.0, "source": "default"}, stage.name
        assert set(thresholds) == set(DEFAULTS)
        assert "not_checked" in stage.verify
    assert "## Thresholds" in (result.run_dir / "report.md").read_text()
