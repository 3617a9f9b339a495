"""engine (onnxruntime): an offline-optimized ONNX Runtime model and its session settings.

ONNX Runtime applies its graph optimizations once here and saves the result; the engine is
then opened with optimizations off, so what ships is exactly what was verified. Optimized
graphs at level 'all' may hold kernels chosen for this CPU, so the key carries the CPU
fingerprint and the ONNX Runtime version.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..cache import Entry
from ..errors import StageError
from ..runtime.ort_lm import SessionSettings
from ..target import ort_cpu_target
from .base import Stage, Verification
from .simplify import link_or_copy

FUSE_DIR = ".fuse"


class OrtEngineStage(Stage):
    name = "engine"
    version = 3
    target_specific = True
    tools = ("onnxruntime",)

    def target(self) -> dict[str, Any]:
        return ort_cpu_target(self.spec.execution_provider)

    def _int4_accuracy(self) -> int | None:
        precision = self.ctx.recipe.recipe.stage("precision")
        return precision.accuracy_level if precision is not None and precision.mode == "int4" else None

    def build_settings(self) -> SessionSettings:
        return SessionSettings(
            execution_provider=self.spec.execution_provider,
            graph_optimization_level=self.spec.graph_optimization_level,
            intra_op_threads=self.spec.intra_op_threads,
            allow_spinning=self.spec.allow_spinning,
            dq_matmulnbits_accuracy_level=self._int4_accuracy(),
        )

    def load_settings(self) -> SessionSettings:
        return SessionSettings(
            execution_provider=self.spec.execution_provider,
            graph_optimization_level="disabled",
            intra_op_threads=self.spec.intra_op_threads,
            allow_spinning=self.spec.allow_spinning,
            dq_matmulnbits_accuracy_level=self._int4_accuracy(),
        )

    def _disabled_optimizers(self) -> list[str]:
        """Signed (TensorRT-flavoured) Q/DQ graphs: ONNX Runtime's CPU pass that turns signed activations
        unsigned rewrites the zero points of the Q/DQ pairs that QDQ propagation inserts but not their
        output_dtype, and the optimized graph then fails type inference (1.31). The graph is kept signed."""
        precision = self.ctx.recipe.recipe.stage("precision")
        if precision is not None and precision.mode == "int8-qdq" and precision.target == "tensorrt":
            return ["QDQS8ToU8Transformer"]
        return []

    def _fused_input(self, src: Path, external: bool, out: Path) -> tuple[Path, dict[str, int]]:
        """The parent graph with each layer's attention rewritten into one 3-D Attention node
        (pipeline/fusion.py), in a scratch folder of `out` that is removed after the build."""
        import onnx

        from ..fusion import fuse_attention

        model = onnx.load(str(src), load_external_data=False)
        counts = fuse_attention(model)
        if not counts["fused"]:
            return src, counts
        scratch = out / FUSE_DIR
        scratch.mkdir()
        if external:  # the initializers stay where they are: the scratch model reads the parent's file
            link_or_copy(src.parent / "model.onnx.data", scratch / "model.onnx.data")
        onnx.save_model(model, str(scratch / "model.onnx"))
        self.ctx.say(f"attention fused into 3-D Attention nodes: {counts['fused']} layers"
                     + (f", {counts['skipped']} left as they were" if counts["skipped"] else ""))
        return scratch / "model.onnx", counts

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        import onnx
        import onnxruntime as ort

        src = parent.file("model.onnx")
        external = parent.file("model.onnx.data").is_file()
        fusion = {"fused": 0, "skipped": 0}
        if self.spec.fuse_attention:
            src, fusion = self._fused_input(src, external, out)
        settings = self.build_settings()
        opts = settings.session_options(out / "model.onnx")
        if external:
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          "model.onnx.data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        self.ctx.say(f"optimizing with ONNX Runtime {ort.__version__} (level {settings.graph_optimization_level})")
        disabled = self._disabled_optimizers()
        try:
            ort.InferenceSession(str(src), sess_options=opts, providers=[settings.execution_provider],
                                 disabled_optimizers=disabled)
        except Exception as exc:
            raise StageError(f"ONNX Runtime could not optimize {src}: {exc}") from exc
        finally:
            shutil.rmtree(out / FUSE_DIR, ignore_errors=True)
        shutil.copy2(parent.file("io.json"), out / "io.json")
        session = {"build": settings.to_dict(), "load": self.load_settings().to_dict(),
                   "onnxruntime": ort.__version__, "disabled_optimizers": disabled}
        (out / "session.json").write_text(json.dumps(session, indent=2) + "\n")
        optimized = onnx.load(str(out / "model.onnx"), load_external_data=False)
        return {"io": parent.meta["stage_meta"]["io"], "session": session, "nodes": len(optimized.graph.node),
                "attention_fusion": fusion,
                "op_types": sorted({n.op_type for n in optimized.graph.node}), "target": self.target()}

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        from ..verify.onnx_check import verify_onnx_lm

        v = verify_onnx_lm(self.ctx, self.verify_spec, out / "model.onnx", meta["io"], self.load_settings(),
                           parent.file("model.onnx"), parent.meta["stage_meta"]["io"])
        v.metrics["nodes"] = meta["nodes"]
        v.metrics["attention_layers_fused"] = meta.get("attention_fusion", {}).get("fused", 0)
        return v

    def describe(self, entry: Entry) -> str:
        return str(entry.file("model.onnx"))
