"""Triton model repositories served by a real Triton server (Python backend, the tritonserver inside
nvidia-pytriton) on 127.0.0.1: greedy tokens over gRPC, with the KV cache passed each step, must equal
PyTorch's, alone and with concurrent clients whose requests the dynamic batcher merges. `make test-servers`
builds the server's environment; `.ci/run` runs it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

from pipeline import Pipeline
from pipeline.artifacts import OnnxArtifact
from pipeline.cache import ArtifactCache
from pipeline.runtime.torch_lm import TorchLM, load_hf_causal_lm
from pipeline.runtime.triton_lm import TritonLM

from .conftest import ROOT
from .triton_server import triton_env, triton_server

pytestmark = [pytest.mark.servers, pytest.mark.slow]

PROMPT = "The quick brown fox"


def python_backend_recipe(source: Path, out: Path, **package: object) -> Path:
    """The recipe with its package served by Triton's Python backend (and a local model path made absolute)."""
    recipe = yaml.safe_load(source.read_text())
    path = recipe["model"]["path"]
    if not path.startswith("package:"):
        recipe["model"]["path"] = str((source.parent / path).resolve())
    for stage in recipe["stages"]:
        if stage["type"] == "package":
            stage.update({"server_backend": "python", **package})
    out.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


def served_tokens(result, scratch: Path, prompt: list[int], tokens: int, clients: int = 1) -> tuple[list, dict]:
    """Each client's greedy tokens from the packaged repository in a running server, and the model's statistics."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    package = result.stage("package")
    model = package.meta["model"]
    engine = ArtifactCache(Path(result.report["cache"]["root"])).lookup(result.stage("engine").key)
    assert engine is not None
    io = OnnxArtifact(engine).io

    ids = np.array([prompt], dtype=np.int64)
    outcomes: list = [None] * clients
    with triton_server(Path(package.artifact), scratch) as url:
        def client(i: int) -> None:
            runner = TritonLM(url, model, io)
            try:
                outcomes[i] = runner.generate(ids, tokens).tokens
            except Exception as exc:  # reported below, with the client's number
                outcomes[i] = exc
            finally:
                runner.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = grpcclient.InferenceServerClient(url).get_inference_statistics(model, as_json=True)
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert not errors, errors
    return outcomes, stats["model_stats"][0]


def pytorch_tokens(model_dir: Path, prompt: str, tokens: int) -> tuple[list[int], list[int]]:
    import numpy as np

    model, tokenizer = load_hf_causal_lm(model_dir)
    ids = tokenizer(prompt)["input_ids"]
    return ids, TorchLM(model).generate(np.array([ids], dtype=np.int64), tokens).tokens


def test_tiny_model_served_by_triton_matches_pytorch_with_concurrent_clients(tmp_path):
    triton_env()  # skips with the reason where the server's environment is absent
    recipe = python_backend_recipe(ROOT / "recipes" / "tiny-llama-triton.yaml", tmp_path / "r.yaml",
                                   dynamic_batching={"max_queue_delay_microseconds": 20000,
                                                     "preferred_batch_size": [2, 4]})
    result = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run()
    assert result.ok
    package = result.stage("package")
    assert package.meta["server_backend"] == "python"
    config = (Path(package.artifact) / "tiny-llama" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "platform" not in config
    prompt, expected = pytorch_tokens(ROOT / "models" / "tiny-llama", PROMPT, 24)
    (alone,), _ = served_tokens(result, tmp_path / "one", prompt, 24)
    assert alone == expected
    together, stats = served_tokens(result, tmp_path / "four", prompt, 24, clients=4)
    assert together == [expected] * 4
    requests, executions = int(stats["inference_count"]), int(stats["execution_count"])
    assert requests == 4 * 24  # one request per prefill or decode step and client
    assert executions < requests, "the dynamic batcher merged no requests"
