import json
import shutil

import pytest

from pipeline.errors import ModelError
from pipeline.stages.load import inspect_model

from .conftest import SHIPPED_MODEL


@pytest.fixture
def model_copy(tmp_path):
    dest = tmp_path / "m"
    shutil.copytree(SHIPPED_MODEL, dest)
    return dest


def test_shipped_model_inspects(model_copy):
    info = inspect_model(model_copy, trust_remote_code=False)
    assert info["model_type"] == "llama"
    assert info["geometry"]["num_layers"] >= 1


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        inspect_model(tmp_path / "nope", False)


def test_folder_without_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no \\*.safetensors weights"):
        inspect_model(model_copy, False)


def test_pickle_weights_refused(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle weights are refused"):
        inspect_model(model_copy, False)


def test_truncated_safetensors(model_copy):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="truncated safetensors"):
        inspect_model(model_copy, False)


def test_unsupported_architecture(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="'mamba' is not supported; supported: bert, gemma2, .*llama"):
        inspect_model(model_copy, False)


def test_remote_code_refused_unless_trusted(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="trust_remote_code: true"):
        inspect_model(model_copy, False)
    assert inspect_model(model_copy, True)["model_type"] == "llama"


def test_missing_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="no tokenizer"):
        inspect_model(model_copy, False)


def test_bad_config_json(model_copy):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json: not valid JSON"):
        inspect_model(model_copy, False)
