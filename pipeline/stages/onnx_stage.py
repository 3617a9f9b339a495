"""The base of every stage whose artifact is an ONNX graph (export, simplify, precision, the ONNX
Runtime engine): it writes the I/O spec beside the graph, saves with external data past the
threshold, verifies the graph against the PyTorch reference and its parent, and describes the
artifact by its model.onnx."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..artifacts import OnnxArtifact, artifact_record
from ..cache import Entry
from ..memory import ONNX_OVERHEAD_BYTES
from ..onnx_files import MODEL, save_model
from ..runtime.ort_lm import SessionSettings
from ..verify.result import Verification
from .base import Stage


class OnnxStage(Stage):
    memory_basis = "graph"
    memory_overhead = ONNX_OVERHEAD_BYTES
    memory_factor = 1.0  # one ONNX Runtime session (or the graph in onnx) at a time
    disk_factor = 1.0  # the graph it writes
    reads_reference = True

    def save_graph(self, proto: Any, out: Path, external: bool) -> None:
        save_model(proto, out / MODEL, external)

    def finish(self, out: Path, io: dict[str, Any], parent: OnnxArtifact | None = None,
               **meta: Any) -> dict[str, Any]:
        """Write (or copy from the parent) io.json and return the stage metadata with its artifact record."""
        if parent is not None:
            shutil.copy2(parent.io_file, out / "io.json")
        else:
            (out / "io.json").write_text(json.dumps(io, indent=2) + "\n")
        return {"artifact": artifact_record("onnx"), "io": io, **meta}

    def intermediate_settings(self) -> SessionSettings:
        """How an intermediate graph is verified: plain ONNX Runtime settings, the engine's thread count
        (an ONNX Runtime engine's threads; 1 otherwise)."""
        engine = self.ctx.recipe.recipe.stage("engine")
        return SessionSettings(graph_optimization_level="basic", intra_op_threads=getattr(engine, "intra_op_threads", 1))

    def verify_graph(self, model: Path, io: dict[str, Any], parent: OnnxArtifact | None = None,
                     settings: SessionSettings | None = None) -> Verification:
        from ..verify.onnx_check import verify_onnx_lm

        return verify_onnx_lm(self.ctx, self.policy, model, io, settings or self.intermediate_settings(),
                              parent.model if parent is not None else None, parent.io if parent is not None else None)

    def describe(self, entry: Entry) -> str:
        return str(entry.file(MODEL))
