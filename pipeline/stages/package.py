"""package: a Triton model repository for the engine, and a manifest of what is in it.

Layout inside the entry::

    triton/<model>/config.pbtxt
    triton/<model>/1/model.plan            (TensorRT) or model.onnx [+ model.onnx.data] (ONNX Runtime)
    triton/<model>/manifest.json           every file's sha256, the recipe, the target, the verification

Inputs and outputs (names, types, dims) come from the ONNX graph the engine was built from;
-1 marks a dynamic dimension. Model files are hard-linked from the engine's entry where the
file system allows it (copied otherwise), and checked against the engine's own manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..cache import MANIFEST, Entry
from ..errors import StageError
from ..hashing import file_table, sha256_file
from ..recipe import TensorRTEngineStage
from .base import Stage, Verification

REPOSITORY = "triton"
PACKAGE_MANIFEST = "manifest.json"


def _link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


class PackageStage(Stage):
    name = "package"
    version = 1
    verified = False
    memory_factor = 0.0

    @property
    def model_name(self) -> str:
        return self.spec.model_name or self.ctx.recipe.recipe.name

    def _engine_spec(self):
        return self.ctx.recipe.recipe.stage("engine")

    def _graph_entry(self, engine: Entry) -> Path:
        """The ONNX graph the engine holds (ONNX Runtime) or was built from (TensorRT)."""
        if isinstance(self._engine_spec(), TensorRTEngineStage):
            parent = self.ctx.cache.lookup(engine.meta["parent"])
            if parent is None:
                raise StageError("the ONNX graph the TensorRT engine was built from is no longer cached; "
                                 "run again with --force engine")
            return parent.file("model.onnx")
        return engine.file("model.onnx")

    def triton_model(self, engine: Entry):
        import onnx

        from ..tensorrt.profiles import graph_inputs_of, graph_outputs_of
        from ..triton import ORT_GRAPH_LEVEL_DISABLED, TritonModel, triton_tensors

        graph = onnx.load(str(self._graph_entry(engine)), load_external_data=False).graph
        spec, engine_spec = self.spec, self._engine_spec()
        batching = spec.dynamic_batching.model_dump(mode="json") if spec.dynamic_batching else None
        common = dict(name=self.model_name, max_batch_size=spec.max_batch_size,
                      inputs=triton_tensors(graph_inputs_of(graph), spec.max_batch_size),
                      outputs=triton_tensors(graph_outputs_of(graph), spec.max_batch_size),
                      instance_count=spec.instance_count, dynamic_batching=batching)
        if isinstance(engine_spec, TensorRTEngineStage):
            profiles = tuple(str(i) for i in range(len(engine_spec.profiles)))
            return TritonModel(backend="tensorrt", profiles=profiles, **common)
        # the engine was optimized offline: Triton must open it with ONNX Runtime's optimizations off
        params = {"intra_op_thread_count": str(engine_spec.intra_op_threads), "execution_mode": "0"}
        return TritonModel(backend="onnxruntime", graph_level=ORT_GRAPH_LEVEL_DISABLED, parameters=params, **common)

    def _upstream(self, engine: Entry) -> list[Entry]:
        chain, entry = [], engine
        while entry is not None:
            chain.append(entry)
            parent = entry.meta.get("parent")
            entry = self.ctx.cache.lookup(parent) if parent else None
        return chain[::-1]

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        from ..triton import render_config

        model = self.triton_model(parent)
        folder = out / REPOSITORY / model.name
        version = folder / "1"
        sources = [model.model_file] + (["model.onnx.data"] if parent.file("model.onnx.data").is_file()
                                        and model.backend == "onnxruntime" else [])
        for name in sources:
            _link_or_copy(parent.file(name), version / name)
        (folder / "config.pbtxt").write_text(render_config(model))
        chain = self._upstream(parent)
        recipe_path = self.ctx.recipe.path
        manifest = {
            "schema_version": 1,
            "format": "triton",
            "model": model.name,
            "backend": model.backend,
            "files": file_table(folder),
            "recipe": {"name": self.ctx.recipe.recipe.name, "file": recipe_path.name,
                       "sha256": sha256_file(recipe_path), "text": recipe_path.read_text(encoding="utf-8"),
                       "resolved": self.ctx.recipe.recipe.model_dump(mode="json")},
            "target": parent.meta.get("stage_meta", {}).get("target"),
            "stages": [{"stage": e.meta.get("stage"), "key": e.key, "verify": e.meta.get("verify")} for e in chain],
        }
        (folder / PACKAGE_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        return {"model": model.name, "backend": model.backend, "repository": REPOSITORY,
                "files": sorted(manifest["files"]), "max_batch_size": model.max_batch_size}

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        folder = out / REPOSITORY / meta["model"]
        manifest = json.loads((folder / PACKAGE_MANIFEST).read_text())
        failures, notes, metrics = [], [], {"files": len(manifest["files"])}
        actual = file_table(folder)
        actual.pop(PACKAGE_MANIFEST, None)
        if actual != manifest["files"]:
            failures.append("files in the repository differ from the package manifest")
        engine_files = json.loads(parent.file(MANIFEST).read_text())["files"]
        for rel, info in manifest["files"].items():
            if rel.startswith("1/") and engine_files.get(rel[2:], {}).get("sha256") != info["sha256"]:
                failures.append(f"{rel} is not byte-identical to the verified engine's {rel[2:]}")
        try:
            from ..triton import parse_config

            config = parse_config((folder / "config.pbtxt").read_text())
        except ImportError:
            notes.append("tritonclient is not installed: config.pbtxt was not parsed with Triton's schema")
        except Exception as exc:  # text_format.ParseError
            failures.append(f"config.pbtxt does not parse with Triton's ModelConfig schema: {exc}")
        else:
            expected = self.triton_model(parent)
            got = [(t.name, list(t.dims)) for t in config.input]
            want = [(t.name, list(t.dims)) for t in expected.inputs]
            if got != want or config.max_batch_size != expected.max_batch_size:
                failures.append("config.pbtxt inputs or max_batch_size differ from the graph's")
            metrics["schema_checked"] = True
        return Verification(passed=not failures, metrics=metrics, failures=failures, notes=notes)

    def describe(self, entry: Entry) -> str:
        return str(entry.path / REPOSITORY)
