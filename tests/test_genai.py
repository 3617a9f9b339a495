"""The package stage's onnxruntime-genai folder: written from the engine, checked against its graph, and run by
onnxruntime-genai, whose greedy tokens must equal PyTorch's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import Pipeline
from pipeline.errors import RecipeError
from pipeline.genai import check_config, check_model_type

from .conftest import ROOT


@pytest.fixture(scope="module")
def genai_run(tmp_path_factory):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    cache = tmp_path_factory.mktemp("genai-cache")
    return Pipeline.from_recipe(ROOT / "recipes" / "tiny-llama-genai.yaml", cache_dir=cache).run()


@pytest.mark.slow
def test_genai_runs_the_packaged_engine_and_matches_pytorch(genai_run):
    v = genai_run.stage("package").verify
    assert v["passed"] and not v["not_checked"]
    assert v["metrics"]["genai_greedy_tokens_matched"] == v["metrics"]["greedy_tokens_total"] == 32
    folder = Path(genai_run.stage("package").artifact)
    assert {p.name for p in folder.iterdir()} >= {"genai_config.json", "model.onnx", "tokenizer.json", "manifest.json"}
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (4, 2, 32)


@pytest.mark.slow
def test_a_config_that_disagrees_with_the_graph_is_caught(genai_run):
    import onnx

    folder = Path(genai_run.stage("package").artifact)
    config = json.loads((folder / "genai_config.json").read_text())
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert check_config(config, graph) == []
    config["model"]["decoder"]["num_key_value_heads"] = 4
    config["model"]["decoder"]["num_hidden_layers"] = 3
    problems = check_config(config, graph)
    assert any("KV heads" in p for p in problems) and any("more than num_hidden_layers 3" in p for p in problems)


def test_model_types_genai_cannot_run_are_refused_with_the_alternative():
    check_model_type("llama", "r.yaml")
    with pytest.raises(RecipeError, match=r"r.yaml: format genai: .* 'gpt_neox'.*format: triton"):
        check_model_type("gpt_neox", "r.yaml")
