from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import RecipeError
from pipeline.recipe import Recipe, load_recipe, parse_recipe

HERE = Path(__file__).parent
BAD = sorted((HERE / "bad_recipes").glob("*.yaml"))
RECIPES = sorted((HERE.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_malformed_recipe_gets_one_clear_message(path):
    expect = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert str(path) in message, "the message names the file"
    assert expect in message
    assert "Traceback" not in message


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate_and_round_trip(path):
    loaded = load_recipe(path)
    again = Recipe.model_validate(loaded.recipe.model_dump(mode="json"))
    assert again == loaded.recipe


def test_model_path_resolves_against_recipe_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    recipe = tmp_path / "sub" / "r.yaml"
    recipe.write_text("schema_version: 1\nname: r\nmodel: {path: ../m}\nstages: [{type: export}]\n")
    assert load_recipe(recipe).model_path == (tmp_path / "m").resolve()


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(
        ["schema_version", "name", "model", "path", "stages", "type", "opset", "tool", "verify", "latency", "x"]),
        inner, max_size=5)), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(yaml_values)
def test_loader_never_crashes_on_structured_input(value):
    import yaml

    text = yaml.safe_dump(value)
    try:
        parse_recipe(text, "fuzz.yaml")
    except RecipeError as exc:
        assert str(exc).startswith("fuzz.yaml")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_loader_never_crashes_on_text(text):
    try:
        parse_recipe(text, "fuzz.yaml")
    except RecipeError as exc:
        assert str(exc).startswith("fuzz.yaml")
