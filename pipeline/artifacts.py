"""Typed views of what one stage hands the next, read from a cache entry.

Every stage's build returns its metadata with an `artifact` record (`kind` and what that kind
declares); later stages read their input through these classes instead of file-name
conventions:

    model        the load stage: a Hugging Face folder, described (`model`), not copied
    checkpoint   the quantize stage: a quantized checkpoint, the FP32 model/ later stages export
                 and are checked against, and the integers (qparams) a lowering reproduces
    onnx         export, simplify, precision and the ONNX Runtime engine: model.onnx (+ .data), io.json
    engine       an engine another runtime loads (TensorRT's model.plan)
    package      a repository for a server

An artifact that changes the PyTorch model later ONNX stages are verified against says so
(`reference_model`); an engine says how a server loads it (`serving`), so packaging never
guesses the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import Entry
from .errors import StageError
from .onnx_files import EXTERNAL_DATA, MODEL

KINDS = ("model", "checkpoint", "onnx", "engine", "package")


def artifact_record(kind: str, **fields: Any) -> dict[str, Any]:
    """The `artifact` record a stage's build returns in its metadata."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {', '.join(KINDS)}")
    return {"kind": kind, **fields}


@dataclass(frozen=True)
class Artifact:
    entry: Entry

    @property
    def meta(self) -> dict[str, Any]:
        return self.entry.meta.get("stage_meta", {})

    @property
    def record(self) -> dict[str, Any]:
        return self.meta.get("artifact") or {}

    @property
    def kind(self) -> str:
        return self.record.get("kind", "?")

    @property
    def folder(self) -> Path:
        return self.entry.path

    @property
    def model_info(self) -> dict[str, Any]:
        """The model's description from the load stage (a checkpoint updates its weights' size)."""
        info = self.meta.get("model")
        if info is None:
            raise StageError(f"cache entry {self.entry.key[:12]} ({self.kind}) carries no model description")
        return info

    @property
    def reference_model(self) -> Path | None:
        """The PyTorch model folder later ONNX stages are exported from and verified against, where this
        artifact sets one."""
        rel = self.record.get("reference_model")
        return None if rel is None else self.folder / rel

    @property
    def serving(self) -> dict[str, Any] | None:
        return self.record.get("serving")

    def expect(self, *kinds: str) -> None:
        if self.kind not in kinds:
            raise StageError(f"expected a {' or '.join(kinds)} artifact from the stage before, got {self.kind} "
                             f"(cache entry {self.entry.key[:12]}); rebuild with --force")


@dataclass(frozen=True)
class OnnxArtifact(Artifact):
    @property
    def model(self) -> Path:
        return self.entry.file(MODEL)

    @property
    def external(self) -> bool:
        return self.entry.file(EXTERNAL_DATA).is_file()

    @property
    def io(self) -> dict[str, Any]:
        return self.meta["io"]

    @property
    def io_file(self) -> Path:
        return self.entry.file("io.json")


@dataclass(frozen=True)
class CheckpointArtifact(Artifact):
    @property
    def qparams(self) -> Path:
        return self.entry.file(self.record.get("qparams", "qparams.safetensors"))


def onnx_input(entry: Entry | None) -> OnnxArtifact:
    if entry is None:
        raise StageError("this stage needs an ONNX artifact from the stage before it")
    artifact = OnnxArtifact(entry)
    artifact.expect("onnx")
    return artifact


def artifact_of(entry: Entry) -> Artifact:
    kind = (entry.meta.get("stage_meta", {}).get("artifact") or {}).get("kind")
    return {"onnx": OnnxArtifact, "checkpoint": CheckpointArtifact}.get(kind or "", Artifact)(entry)
