"""Per-run state passed explicitly to every stage: recipe, cache, progress, the artifacts of the
stages run so far, and the PyTorch reference (loaded at most once, and only when some stage
actually has to run)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .artifacts import Artifact, artifact_of
from .cache import ArtifactCache, Entry

if TYPE_CHECKING:
    from .recipe import LoadedRecipe


@dataclass
class RunContext:
    recipe: LoadedRecipe
    cache: ArtifactCache
    say: Callable[[str], None] = lambda msg: None
    # the PyTorch model that ONNX stages are checked against: the recipe's model, or the one an upstream
    # artifact names as its reference_model (a quantize stage's model/); set as artifacts arrive
    source: Path | None = None
    artifacts: list[Artifact] = field(default_factory=list)
    _models: dict[Path, tuple[Any, Any]] = field(default_factory=dict)
    _tokenizers: dict[Path, Any] = field(default_factory=dict)
    _references: dict[Path, Any] = field(default_factory=dict)
    _task: str | None = None
    _baselines: dict[Any, dict[str, Any]] = field(default_factory=dict)
    # planning only: a model folder with a config.json and no weights is accepted (sizes estimated)
    planning: bool = False
    # returns the GPU fingerprint (pipeline.gpu.detect_gpu unless a caller injects another)
    gpu_probe: Callable[[], Any] | None = None
    _gpu: Any = None
    _model_dir: Path | None = None

    @property
    def model_path(self) -> Path:
        """The recipe's model as a Hugging Face folder: its folder, or the folder a GGUF file was converted
        into (once, cached; pipeline/gguf_import.py)."""
        if self._model_dir is None:
            from .gguf_import import resolve_model_source

            self._model_dir = resolve_model_source(self.recipe.model_path, self.cache, self.say)
        return self._model_dir

    def imports(self) -> list[str]:
        """Cache keys of the folders this run's model was converted into (a GGUF source), for `cache gc`."""
        from .gguf_import import is_gguf

        if self._model_dir is None or not is_gguf(self.recipe.model_path):
            return []
        return [self._model_dir.name]

    def arrived(self, entry: Entry) -> None:
        """A stage's artifact is ready: later stages may read it, and it may change their reference model."""
        artifact = artifact_of(entry)
        self.artifacts.append(artifact)
        if artifact.reference_model is not None:
            self.source = artifact.reference_model

    def upstream(self, kind: str) -> Artifact | None:
        """The latest artifact of a kind from the stages run so far."""
        return next((a for a in reversed(self.artifacts) if a.kind == kind), None)

    def gpu(self):
        """This machine's GPU fingerprint, probed once per run."""
        if self._gpu is None:
            from .gpu import detect_gpu

            self._gpu = (self.gpu_probe or detect_gpu)()
        return self._gpu

    @property
    def verify_spec(self):
        return self.recipe.recipe.verify

    @property
    def task(self) -> str:
        """'causal-lm' or 'feature-extraction', from the model's architecture entry."""
        if self._task is None:
            import json

            from .arch import arch_for

            config = json.loads((self.model_path / "config.json").read_text())
            self._task = arch_for(config, str(self.model_path)).task
        return self._task

    @property
    def source_path(self) -> Path:
        return self.source or self.model_path

    def model_at(self, path: Path) -> tuple[Any, Any]:
        """A PyTorch model and tokenizer from a folder, loaded once per run."""
        if path not in self._models:
            from .runtime.torch_lm import load_hf_causal_lm

            self.say(f"loading the PyTorch model from {path}")
            self._models[path] = load_hf_causal_lm(path, self.recipe.recipe.model.trust_remote_code, self.task)
        return self._models[path]

    def original_model(self) -> tuple[Any, Any]:
        return self.model_at(self.model_path)

    def reference_model(self) -> tuple[Any, Any]:
        """The model ONNX stages are exported from and verified against."""
        return self.model_at(self.source_path)

    def tokenizer(self) -> Any:
        """The reference model's tokenizer, without loading the model when it is not held."""
        path = self.source_path
        if path in self._models:
            return self._models[path][1]
        if path not in self._tokenizers:
            from .runtime.torch_lm import load_hf_tokenizer

            self._tokenizers[path] = load_hf_tokenizer(path, self.recipe.recipe.model.trust_remote_code)
        return self._tokenizers[path]

    def release_models(self) -> None:
        """Drop every PyTorch model this run holds (their reference outputs and baselines stay): ONNX Runtime
        then runs without a second copy of the weights beside it. A later stage that needs one loads it again."""
        if not self._models:
            return
        from .memory import return_freed_memory

        for path, (_, tokenizer) in self._models.items():
            self._tokenizers.setdefault(path, tokenizer)
        self._models.clear()
        return_freed_memory()

    # what a stage run in a child process learned that later stages reuse (pipeline/isolation.py); models
    # stay behind: every stage that needs one loads it in its own process
    _PORTABLE = ("_tokenizers", "_references", "_task", "_baselines", "_gpu", "_model_dir")

    def portable_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._PORTABLE}

    def absorb(self, state: dict[str, Any]) -> None:
        for name in self._PORTABLE:
            value = state[name]
            if isinstance(value, dict):
                getattr(self, name).update(value)
            elif value is not None:
                setattr(self, name, value)

    def reference(self):
        """PyTorch outputs on the verification cases, computed once per run and reference model."""
        path = self.source_path
        if path not in self._references:
            model, tokenizer = self.reference_model()
            self.say("computing PyTorch reference outputs")
            if self.task == "causal-lm":
                from .runtime.torch_lm import TorchLM
                from .verify.accuracy import build_reference

                self._references[path] = build_reference(TorchLM(model), tokenizer, self.verify_spec)
            else:
                from .verify.embedding import build_embedding_reference

                self._references[path] = build_embedding_reference(model, tokenizer, self.pooling(),
                                                                   self.verify_spec)
        return self._references[path]

    def pooling(self) -> dict[str, Any]:
        from .arch import sentence_pooling

        return sentence_pooling(self.model_path)

    def latency_prompt(self):
        from .textdata import load_text
        from .verify.latency import latency_prompt

        text = load_text("pydoc:eval").content
        return latency_prompt(self.tokenizer(), text, self.verify_spec.latency.prompt_tokens)

    def baseline(self, key: Any, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A PyTorch baseline measurement, taken once per run for each key."""
        if key not in self._baselines:
            self._baselines[key] = measure()
        return self._baselines[key]

    def baseline_latency(self, threads: int) -> dict[str, Any]:
        """PyTorch eager decode latency with the same thread count, measured once per run."""

        def measure() -> dict[str, Any]:
            from .runtime.torch_lm import TorchLM
            from .verify.latency import measure_latency

            self.say(f"timing the PyTorch eager baseline ({threads or 'all'} threads)")
            runner = TorchLM(self.reference_model()[0], threads=threads or None)
            return measure_latency(runner, self.latency_prompt(), self.verify_spec.latency)

        return self.baseline(("decode", threads), measure)
