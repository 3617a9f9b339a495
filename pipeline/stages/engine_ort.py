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
from typing import Any, ClassVar, Literal

from pydantic import Field

from ..artifacts import onnx_input
from ..cache import Entry
from ..config import Strict
from ..errors import StageError
from ..onnx_files import EXTERNAL_DATA, MODEL, link_or_copy
from ..runtime.ort_lm import SessionSettings
from ..target import ort_cpu_target
from ..triton import ORT_GRAPH_LEVEL_DISABLED
from ..verify.result import Verification
from .onnx_stage import OnnxStage

FUSE_DIR = ".fuse"
FUSION_OPSET = 23  # the fusion rewrites ONNX Attention nodes, which exist from opset 23


class OrtEngineConfig(Strict):
    type: Literal["engine"]
    backend: Literal["onnxruntime"] = "onnxruntime"
    execution_provider: Literal["CPUExecutionProvider"] = "CPUExecutionProvider"
    graph_optimization_level: Literal["basic", "extended", "all"] = "all"
    intra_op_threads: int = Field(default=1, ge=0, description="0 lets ONNX Runtime use every core.")
    allow_spinning: bool = Field(default=False, description="Thread spinning; off is faster on shared cores.")
    fuse_attention: bool = Field(
        default=True, description="Rewrite each layer's opset-23 attention (head reshapes, KV concat, grouped-query "
                                  "repeat) into one 3-D Attention node with its KV cache; verified like any build.")


class OrtEngineStage(OnnxStage):
    name = "engine"
    memory_factor = 0.95  # the session over the graph as lowered (measured 0.96 on FP32, 0.79 on INT8 graphs)
    Config: ClassVar[type] = OrtEngineConfig
    version = 4
    target_specific = True
    tools = ("onnxruntime",)

    def target(self) -> dict[str, Any]:
        return ort_cpu_target(self.spec.execution_provider)

    def _int4_accuracy(self) -> int | None:  # the engine's session needs the precision stage's MatMulNBits level
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
            link_or_copy(src.parent / EXTERNAL_DATA, scratch / EXTERNAL_DATA)
        onnx.save_model(model, str(scratch / MODEL))
        self.ctx.say(f"attention fused into 3-D Attention nodes: {counts['fused']} layers"
                     + (f", {counts['skipped']} left as they were" if counts["skipped"] else ""))
        return scratch / MODEL, counts

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        import onnx
        import onnxruntime as ort

        source = onnx_input(parent)
        src, external = source.model, source.external
        fusion = {"fused": 0, "skipped": 0}
        if self.spec.fuse_attention:
            src, fusion = self._fused_input(src, external, out)
        settings = self.build_settings()
        opts = settings.session_options(out / MODEL)
        if external:
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", EXTERNAL_DATA)
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
        session = {"build": settings.to_dict(), "load": self.load_settings().to_dict(),
                   "onnxruntime": ort.__version__, "disabled_optimizers": disabled}
        (out / "session.json").write_text(json.dumps(session, indent=2) + "\n")
        optimized = onnx.load(str(out / MODEL), load_external_data=False)
        meta = self.finish(out, source.io, source, session=session, nodes=len(optimized.graph.node),
                           attention_fusion=fusion, op_types=sorted({n.op_type for n in optimized.graph.node}),
                           target=self.target())
        meta["artifact"]["serving"] = self.serving(external)
        return meta

    def serving(self, external: bool) -> dict[str, Any]:
        """How a server loads this engine: Triton's onnxruntime backend, with ONNX Runtime's optimizations
        off (they were applied once, offline, and verified)."""
        return {"triton_backend": "onnxruntime", "files": [MODEL] + ([EXTERNAL_DATA] if external else []),
                "graph": MODEL, "graph_level": ORT_GRAPH_LEVEL_DISABLED,
                "parameters": {"intra_op_thread_count": str(self.spec.intra_op_threads), "execution_mode": "0"}}

    def _fusion_skips(self, fusion: dict[str, int], v: Verification) -> None:
        if not self.spec.fuse_attention:
            return
        opset = getattr(self.ctx.recipe.recipe.stage("export"), "opset", None)
        if fusion.get("fused", 0) == 0 and fusion.get("skipped", 0) == 0:
            why = (f"the graph has no ONNX Attention node to fuse (exported at opset {opset}; the fusion needs "
                   f"opset {FUSION_OPSET}): set export.opset: {FUSION_OPSET}, or engine.fuse_attention: false")
            v.skip("attention fusion", why)
        elif fusion.get("skipped", 0):
            v.skip("attention fusion", f"{fusion['skipped']} attention layers did not match the fused pattern and "
                                       "were left as exported")

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        v = self.verify_graph(out / MODEL, meta["io"], onnx_input(parent), self.load_settings())
        v.metrics["nodes"] = meta["nodes"]
        v.metrics["attention_layers_fused"] = meta.get("attention_fusion", {}).get("fused", 0)
        self._fusion_skips(meta.get("attention_fusion", {}), v)
        return v
