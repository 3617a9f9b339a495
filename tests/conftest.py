"""Shared fixtures: the shipped model, tiny random models built from config, temp caches."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Stages run in this process in tests (a monkeypatch reaches them, and no stage pays a fresh interpreter's
# imports); tests/test_isolation.py and tests/test_scale.py run them in processes of their own, as the CLI does.
os.environ.setdefault("ENGINEWRIGHT_IN_PROCESS", "1")

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = ROOT / "models" / "tiny-llama"
DEFAULT_RECIPE = ROOT / "recipes" / "tiny-llama.yaml"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_recipe(path: Path, model: Path, stages: str | None = None, verify: str | None = None,
                 name: str = "test") -> Path:
    stages = stages or """
  - type: export
  - type: simplify
    tool: onnxslim
  - type: engine
    intra_op_threads: 1
"""
    verify = verify or """
  greedy_tokens: 8
  latency: {warmup: 1, repeats: 2, prompt_tokens: 16, decode_tokens: 8}
"""
    path.write_text(f"schema_version: 1\nname: {name}\nmodel:\n  path: {model}\nstages:{stages}verify:{verify}")
    return path


def build_random_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random-weight LLaMA with the shipped tokenizer: enough for parity tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(SHIPPED_MODEL / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def random_llama(tmp_path_factory) -> Path:
    return build_random_llama(tmp_path_factory.mktemp("models") / "random-llama")


@pytest.fixture(scope="session")
def shipped_run(tmp_path_factory):
    """One full run of the default recipe on the shipped model, in a fresh cache (shared by tests)."""
    from pipeline import Pipeline

    cache = tmp_path_factory.mktemp("cache-shipped")
    result = Pipeline.from_recipe(DEFAULT_RECIPE, cache_dir=cache).run()
    return result, cache


@pytest.fixture(scope="session")
def method_cli(tmp_path_factory):
    """`run <recipe> --json --until quantize` through the command line, once per shipped method recipe, all into
    one cache: tests/test_failures.py checks their stdout, tests/test_quant_methods.py builds on their entries."""
    cache = tmp_path_factory.mktemp("method-cache")
    done: dict[str, subprocess.CompletedProcess] = {}

    def run(name: str) -> subprocess.CompletedProcess:
        if name not in done:
            done[name] = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "recipes" / name),
                                         "--json", "--until", "quantize", "--cache-dir", str(cache)],
                                        capture_output=True, text=True, cwd=cache.parent, timeout=1200)
        return done[name]

    run.cache = cache  # type: ignore[attr-defined]
    return run


# `make test` runs the unit tier on every core (pytest-xdist, --dist loadgroup). Each file is one group, so a
# module's fixtures are built once; files that share a session fixture share a group, so it is built once too.
SHARED_FIXTURE_GROUPS = {
    "test_failures": "method_cli", "test_quant_methods": "method_cli",
    "test_fusion": "shipped_run", "test_pipeline": "shipped_run", "test_policy": "shipped_run",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.stem
        item.add_marker(pytest.mark.xdist_group(SHARED_FIXTURE_GROUPS.get(module, module)))
