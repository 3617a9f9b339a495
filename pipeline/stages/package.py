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
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from ..artifacts import Artifact, artifact_record
from ..cache import MANIFEST, Entry
from ..config import Strict
from ..errors import StageError
from ..hashing import file_table, sha256_file
from ..onnx_files import link_or_copy
from ..verify.result import Verification
from .base import Stage

REPOSITORY = "triton"
PACKAGE_MANIFEST = "manifest.json"


class DynamicBatching(Strict):
    max_queue_delay_microseconds: int = Field(default=100, ge=0)
    preferred_batch_size: tuple[int, ...] = ()


class PackageConfig(Strict):
    """A Triton model repository for the engine, with a manifest of every file."""

    type: Literal["package"]
    format: Literal["triton"] = "triton"
    model_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                                   description="Folder name in the repository; the recipe name by default.")
    max_batch_size: int = Field(
        default=0, ge=0, description="0: Triton does not batch and dims include the batch axis; above 0: the "
                                     "batch axis must lead every input and output and is left out of dims.")
    dynamic_batching: DynamicBatching | None = None
    instance_count: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _batching(self) -> PackageConfig:
        if self.dynamic_batching is not None:
            if self.max_batch_size == 0:
                raise ValueError("dynamic_batching needs max_batch_size > 0 (Triton batches only models that "
                                 "declare a batch axis)")
            too_big = [b for b in self.dynamic_batching.preferred_batch_size if not 1 <= b <= self.max_batch_size]
            if too_big:
                raise ValueError(f"preferred_batch_size {too_big} must lie in 1..max_batch_size "
                                 f"({self.max_batch_size})")
        return self


class PackageStage(Stage):
    name = "package"
    Config: ClassVar[type] = PackageConfig
    version = 2
    verified = False
    memory_factor = 0.0

    @property
    def model_name(self) -> str:
        return self.spec.model_name or self.ctx.recipe.recipe.name

    def _serving(self, engine: Entry) -> dict[str, Any]:
        serving = Artifact(engine).serving
        if not serving:
            backend = getattr(self.ctx.recipe.recipe.stage("engine"), "backend", "?")
            raise StageError(f"the engine (backend {backend}) does not say how a server loads it, so it cannot be "
                             "packaged; rebuild it with --force engine")
        return serving

    def triton_model(self, engine: Entry):
        from ..tensorrt.profiles import GraphInput, graph_inputs_of, graph_outputs_of
        from ..triton import TritonModel, triton_tensors

        serving = self._serving(engine)
        if "graph" in serving:  # the graph is in the engine's entry (ONNX Runtime)
            import onnx

            graph = onnx.load(str(engine.file(serving["graph"])), load_external_data=False).graph
            inputs, outputs = graph_inputs_of(graph), graph_outputs_of(graph)
        else:  # the tensors of the graph the engine was built from (TensorRT)
            inputs = [GraphInput(t["name"], tuple(t["dims"]), t["dtype"]) for t in serving["tensors"]["inputs"]]
            outputs = [GraphInput(t["name"], tuple(t["dims"]), t["dtype"]) for t in serving["tensors"]["outputs"]]
        spec = self.spec
        batching = spec.dynamic_batching.model_dump(mode="json") if spec.dynamic_batching else None
        return TritonModel(name=self.model_name, backend=serving["triton_backend"], max_batch_size=spec.max_batch_size,
                           inputs=triton_tensors(inputs, spec.max_batch_size),
                           outputs=triton_tensors(outputs, spec.max_batch_size), instance_count=spec.instance_count,
                           dynamic_batching=batching, profiles=tuple(serving.get("profiles", ())),
                           parameters=dict(serving.get("parameters", {})), graph_level=serving.get("graph_level"))

    def _upstream(self, engine: Entry) -> list[Entry]:
        chain: list[Entry] = []
        entry: Entry | None = engine
        while entry is not None:
            chain.append(entry)
            parent = entry.meta.get("parent")
            entry = self.ctx.cache.lookup(parent) if parent else None
        return chain[::-1]

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        from ..triton import render_config

        if parent is None:
            raise StageError("package needs an engine from the stage before it")
        model = self.triton_model(parent)
        folder = out / REPOSITORY / model.name
        version = folder / "1"
        for name in self._serving(parent)["files"]:
            link_or_copy(parent.file(name), version / name)
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
        return {"artifact": artifact_record("package"), "model": model.name, "backend": model.backend,
                "repository": REPOSITORY,
                "files": sorted(manifest["files"]), "max_batch_size": model.max_batch_size}

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        if parent is None:
            raise StageError("package needs an engine from the stage before it")
        folder = out / REPOSITORY / meta["model"]
        manifest = json.loads((folder / PACKAGE_MANIFEST).read_text())
        failures: list[str] = []
        notes: list[str] = []
        metrics: dict[str, Any] = {"files": len(manifest["files"])}
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
            schema_skipped = True
        except Exception as exc:  # text_format.ParseError
            schema_skipped = False
            failures.append(f"config.pbtxt does not parse with Triton's ModelConfig schema: {exc}")
        else:
            schema_skipped = False
            expected = self.triton_model(parent)
            got = [(t.name, list(t.dims)) for t in config.input]
            want = [(t.name, list(t.dims)) for t in expected.inputs]
            if got != want or config.max_batch_size != expected.max_batch_size:
                failures.append("config.pbtxt inputs or max_batch_size differ from the graph's")
            metrics["schema_checked"] = True
        v = Verification(passed=not failures, metrics=metrics, failures=failures, notes=notes)
        if schema_skipped:
            metrics["schema_checked"] = False
            v.skip("config.pbtxt against Triton's ModelConfig schema",
                   "tritonclient is not installed (pip install 'tritonclient[grpc]')")
        return v

    def describe(self, entry: Entry) -> str:
        return str(entry.path / REPOSITORY)
