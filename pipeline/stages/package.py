"""package: a Triton model repository or an onnxruntime-genai folder for the engine, and a manifest of what
is in it.

Layout inside the entry::

    triton/<model>/config.pbtxt
    triton/<model>/1/model.plan            (TensorRT) or model.onnx [+ model.onnx.data] (ONNX Runtime)
    triton/<model>/manifest.json           every file's sha256, the recipe, the target, the verification
    genai/                                 format genai: genai_config.json, model.onnx [+ .data], tokenizer,
                                           manifest.json (pipeline/genai.py)

Inputs and outputs (names, types, dims) come from the ONNX graph the engine was built from;
-1 marks a dynamic dimension. Model files are hard-linked from the engine's entry where the
file system allows it (copied otherwise), and checked against the engine's own manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from ..artifacts import Artifact, artifact_record
from ..cache import MANIFEST, Entry
from ..config import Strict
from ..errors import RecipeError, StageError
from ..hashing import file_table, sha256_file
from ..onnx_files import link_or_copy
from ..verify.result import Verification
from .base import Stage

REPOSITORY = "triton"
GENAI_FOLDER = "genai"
PACKAGE_MANIFEST = "manifest.json"


class DynamicBatching(Strict):
    max_queue_delay_microseconds: int = Field(default=100, ge=0)
    preferred_batch_size: tuple[int, ...] = ()


class PackageConfig(Strict):
    """A Triton model repository (format triton) or an onnxruntime-genai model folder (format genai) for the
    engine, with a manifest of every file."""

    type: Literal["package"]
    format: Literal["triton", "genai"] = "triton"
    model_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                                   description="Folder name in the repository; the recipe name by default.")
    max_batch_size: int = Field(
        default=0, ge=0, description="0: Triton does not batch and dims include the batch axis; above 0: the "
                                     "batch axis must lead every input and output and is left out of dims.")
    dynamic_batching: DynamicBatching | None = None
    instance_count: int = Field(default=1, ge=1)
    server_backend: Literal["native", "python"] = Field(
        default="native", description="native: Triton's own backend for the engine (onnxruntime or tensorrt, as in "
        "NVIDIA's server containers); python: Triton's Python backend running the ONNX Runtime engine through a "
        "model.py, for servers built without the onnxruntime backend (such as the one inside nvidia-pytriton).")

    @model_validator(mode="after")
    def _batching(self) -> PackageConfig:
        if self.format == "genai" and (self.max_batch_size or self.dynamic_batching or self.instance_count != 1
                                       or self.server_backend != "native"):
            raise ValueError("max_batch_size, dynamic_batching, instance_count and server_backend are Triton "
                             "settings; format genai takes none of them (onnxruntime-genai batches in its own loop)")
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
    disk_factor = 0.0  # model files are hard links to the engine's

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
        if spec.server_backend == "python" and serving["triton_backend"] != "onnxruntime":
            raise RecipeError(f"{self.ctx.recipe.path}: stages.package: server_backend python runs an ONNX Runtime "
                              f"engine; this engine is {serving['triton_backend']}: set server_backend: native")
        batching = spec.dynamic_batching.model_dump(mode="json") if spec.dynamic_batching else None
        return TritonModel(name=self.model_name, backend=serving["triton_backend"], max_batch_size=spec.max_batch_size,
                           inputs=triton_tensors(inputs, spec.max_batch_size),
                           outputs=triton_tensors(outputs, spec.max_batch_size), instance_count=spec.instance_count,
                           dynamic_batching=batching, profiles=tuple(serving.get("profiles", ())),
                           parameters=dict(serving.get("parameters", {})), graph_level=serving.get("graph_level"),
                           server_backend=spec.server_backend)

    def _upstream(self, engine: Entry) -> list[Entry]:
        chain: list[Entry] = []
        entry: Entry | None = engine
        while entry is not None:
            chain.append(entry)
            parent = entry.meta.get("parent")
            entry = self.ctx.cache.lookup(parent) if parent else None
        return chain[::-1]

    def _manifest(self, folder: Path, engine: Entry, **fields: Any) -> dict[str, Any]:
        recipe_path = self.ctx.recipe.path
        manifest = {
            "schema_version": 1, **fields,
            "files": file_table(folder),
            "recipe": {"name": self.ctx.recipe.recipe.name, "file": recipe_path.name,
                       "sha256": sha256_file(recipe_path), "text": recipe_path.read_text(encoding="utf-8"),
                       "resolved": self.ctx.recipe.recipe.model_dump(mode="json")},
            "target": engine.meta.get("stage_meta", {}).get("target"),
            "stages": [{"stage": e.meta.get("stage"), "key": e.key, "verify": e.meta.get("verify")}
                       for e in self._upstream(engine)],
        }
        (folder / PACKAGE_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        return manifest

    def _build_genai(self, engine: Entry, out: Path) -> dict[str, Any]:
        from ..arch import TOKENIZER_FILES
        from ..genai import CONFIG, check_model_type, genai_config

        serving = self._serving(engine)
        where = f"{self.ctx.recipe.path}: stages.package"
        if serving["triton_backend"] != "onnxruntime" or "graph" not in serving:
            raise RecipeError(f"{where}: format genai packages an ONNX Runtime engine; this engine is "
                              f"{serving['triton_backend']}")
        io = Artifact(engine).meta["io"]
        if io.get("task", "causal-lm") != "causal-lm":
            raise RecipeError(f"{where}: format genai packages a causal LM; this model is {io.get('task')}")
        hf = json.loads((self.ctx.model_path / "config.json").read_text())
        check_model_type(hf["model_type"], where)
        folder = out / GENAI_FOLDER
        for name in serving["files"]:
            link_or_copy(engine.file(name), folder / name)
        for name in TOKENIZER_FILES + ("chat_template.jinja",):
            if (self.ctx.model_path / name).is_file():
                link_or_copy(self.ctx.model_path / name, folder / name)
        threads = int(serving.get("parameters", {}).get("intra_op_thread_count", "1"))
        (folder / CONFIG).write_text(json.dumps(genai_config(hf, io, threads), indent=2) + "\n")
        manifest = self._manifest(folder, engine, format="genai", model_type=hf["model_type"])
        return {"artifact": artifact_record("package"), "format": "genai", "folder": GENAI_FOLDER,
                "files": sorted(manifest["files"])}

    def _verify_genai(self, engine: Entry, out: Path) -> Verification:
        import importlib.util

        import onnx

        from ..genai import CONFIG, check_config, generate
        from ..verify.accuracy import matched_prefix

        folder = out / GENAI_FOLDER
        config = json.loads((folder / CONFIG).read_text())
        graph = onnx.load(str(folder / config["model"]["decoder"]["filename"]), load_external_data=False).graph
        failures = [f"genai_config.json: {p}" for p in check_config(config, graph)]
        manifest = self._check_manifest(folder, engine, failures, prefix="")
        v = Verification(passed=not failures, metrics={"files": len(manifest["files"])}, failures=failures)
        if importlib.util.find_spec("onnxruntime_genai") is None:
            v.skip("generation with onnxruntime-genai", "onnxruntime-genai is not installed (pip install "
                   "onnxruntime-genai)")
        elif not failures:
            ref = self.ctx.reference()
            self.ctx.say("generating with onnxruntime-genai")
            tokens = generate(folder, [int(t) for t in ref.greedy_prompt[0]], len(ref.greedy_tokens))
            matched = matched_prefix(tokens, ref.greedy_tokens)
            eos = config["model"]["eos_token_id"]
            stopped = bool(tokens) and tokens[-1] in (eos if isinstance(eos, list) else [eos])
            v.metrics.update({"genai_greedy_tokens_matched": matched, "genai_greedy_tokens": len(tokens),
                              "greedy_tokens_total": len(ref.greedy_tokens)})
            if matched < len(tokens) or (len(tokens) < len(ref.greedy_tokens) and not stopped):
                v.failures.append(f"onnxruntime-genai's greedy tokens match PyTorch's for {matched} of "
                                  f"{len(ref.greedy_tokens)}")
        v.passed = not v.failures
        return v

    def _check_manifest(self, folder: Path, engine: Entry, failures: list[str], prefix: str) -> dict[str, Any]:
        """The folder's files are the manifest's, and the model files (the engine's serving files, under `prefix`)
        are byte-identical to the verified engine's."""
        manifest = json.loads((folder / PACKAGE_MANIFEST).read_text())
        actual = file_table(folder)
        actual.pop(PACKAGE_MANIFEST, None)
        if actual != manifest["files"]:
            failures.append("files in the package differ from its manifest")
        engine_files = json.loads(engine.file(MANIFEST).read_text())["files"]
        for name in self._serving(engine)["files"]:
            got = manifest["files"].get(prefix + name, {}).get("sha256")
            if got is None or got != engine_files.get(name, {}).get("sha256"):
                failures.append(f"{prefix + name} is not byte-identical to the verified engine's {name}")
        return manifest

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        from ..triton import PYTHON_MODEL, render_config

        if parent is None:
            raise StageError("package needs an engine from the stage before it")
        if self.spec.format == "genai":
            return self._build_genai(parent, out)
        model = self.triton_model(parent)
        folder = out / REPOSITORY / model.name
        version = folder / "1"
        for name in self._serving(parent)["files"]:
            link_or_copy(parent.file(name), version / name)
        (folder / "config.pbtxt").write_text(render_config(model))
        if model.server_backend == "python":
            shutil.copyfile(Path(__file__).resolve().parents[1] / "triton_python_model.py", version / PYTHON_MODEL)
        manifest = self._manifest(folder, parent, format="triton", model=model.name, backend=model.backend,
                                  server_backend=model.server_backend)
        return {"artifact": artifact_record("package"), "model": model.name, "backend": model.backend,
                "server_backend": model.server_backend,
                "repository": REPOSITORY,
                "files": sorted(manifest["files"]), "max_batch_size": model.max_batch_size}

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        if parent is None:
            raise StageError("package needs an engine from the stage before it")
        if meta.get("format") == "genai":
            return self._verify_genai(parent, out)
        folder = out / REPOSITORY / meta["model"]
        failures: list[str] = []
        notes: list[str] = []
        manifest = self._check_manifest(folder, parent, failures, prefix="1/")
        metrics: dict[str, Any] = {"files": len(manifest["files"])}
        if meta.get("server_backend") == "python":
            import ast

            from ..triton import PYTHON_MODEL

            try:
                tree = ast.parse((folder / "1" / PYTHON_MODEL).read_text(), PYTHON_MODEL)
            except (OSError, SyntaxError) as exc:
                failures.append(f"1/{PYTHON_MODEL} cannot be read as Python: {exc}")
            else:
                if not any(isinstance(n, ast.ClassDef) and n.name == "TritonPythonModel" for n in tree.body):
                    failures.append(f"1/{PYTHON_MODEL} defines no TritonPythonModel class")
            notes.append("served by Triton's Python backend: 1/model.py runs the engine's file with ONNX Runtime")
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
        meta = entry.meta.get("stage_meta", {})
        return str(entry.path / (meta.get("folder") or meta.get("repository") or REPOSITORY))
