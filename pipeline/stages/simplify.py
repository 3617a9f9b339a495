"""simplify: constant folding and graph clean-up with onnxslim or onnxsim (or none).

The simplifier's own checks are not trusted (onnxsim has been seen to corrupt graphs while
its check passed): the result goes through the same verification as the export. A simplifier
that cannot run on the graph (onnxsim holds the whole model in one protobuf, so it cannot take
one over 2 GB) leaves the graph unchanged, and the report counts that as not checked.

onnxslim on a graph whose weights are in external data is given the graph alone (the weights not
loaded): it folds and cleans the nodes, keeps the initializers' references, and the result reads the
same weights file (hard-linked). On SmolLM2-135M that took 0.9 s and 0.14 GB against 20 s and 4.3 GB with
the weights loaded, for the same 1,032 nodes and identical logits, and it is what lets a graph past the
2 GB protobuf limit be simplified at all.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..artifacts import onnx_input
from ..cache import Entry
from ..config import Strict
from ..errors import StageError
from ..onnx_files import EXTERNAL_DATA, MODEL, PROTOBUF_LIMIT, copy_data_file, copy_onnx, onnx_bytes
from ..verify.result import Verification
from .onnx_stage import OnnxStage


class SimplifyConfig(Strict):
    type: Literal["simplify"]
    tool: Literal["onnxslim", "onnxsim", "none"] = "onnxslim"


class SimplifyStage(OnnxStage):
    name = "simplify"
    Config: ClassVar[type] = SimplifyConfig
    version = 3

    @property
    def tools(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("onnx",) + ((self.spec.tool,) if self.spec.tool != "none" else ())

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        import onnx

        src = onnx_input(parent)
        before = onnx.load(str(src.model), load_external_data=False)
        nodes_before = len(before.graph.node)
        skipped: list[dict[str, str]] = []
        if self.spec.tool == "none":
            copy_onnx(src.folder, out)
            proto = before
        elif self.spec.tool == "onnxsim" and onnx_bytes(src.folder) >= PROTOBUF_LIMIT:
            skipped.append({"what": "simplification (onnxsim)",
                            "why": f"the model is {onnx_bytes(src.folder) / 1e9:.2f} GB and onnxsim holds it in one "
                                   "protobuf (2 GB at most); the graph is unchanged. Use tool: onnxslim"})
            copy_onnx(src.folder, out)
            proto = before
        elif self.spec.tool == "onnxslim" and src.external:
            proto = self._slim_graph_only(src.model, out)
        else:
            model = onnx.load(str(src.model))
            self.ctx.say(f"simplifying with {self.spec.tool}")
            with contextlib.redirect_stdout(sys.stderr):
                try:
                    if self.spec.tool == "onnxslim":
                        import onnxslim

                        proto = onnxslim.slim(model)
                    else:
                        import onnxsim

                        proto, _ = onnxsim.simplify(model, check_n=0)
                except Exception as exc:
                    raise StageError(f"{self.spec.tool} failed on {src.model}: {exc}") from exc
            self.save_graph(proto, out, src.external)
        return self.finish(out, src.io, src, tool=self.spec.tool, nodes_before=nodes_before,
                           nodes=len(proto.graph.node), skipped=skipped)

    def _slim_graph_only(self, src: Path, out: Path) -> Any:
        import onnx
        import onnxslim

        light = onnx.load(str(src), load_external_data=False)
        self.ctx.say("simplifying with onnxslim (graph only; the weights stay in their external data file)")
        with contextlib.redirect_stdout(sys.stderr):
            try:
                proto = onnxslim.slim(light)
            except Exception as exc:
                raise StageError(f"onnxslim failed on {src} (graph only): {exc}") from exc
        locations = {e.value for i in proto.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL
                     for e in i.external_data if e.key == "location"}
        if locations - {EXTERNAL_DATA}:
            raise StageError(f"onnxslim left initializers pointing at {sorted(locations)}; expected {EXTERNAL_DATA}")
        copy_data_file(src.parent / EXTERNAL_DATA, out / EXTERNAL_DATA)
        onnx.save_model(proto, str(out / MODEL))
        return proto

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        v = self.verify_graph(out / MODEL, meta["io"], onnx_input(parent))
        v.metrics["nodes_before"] = meta["nodes_before"]
        v.metrics["nodes_after"] = meta["nodes"]
        for item in meta.get("skipped", []):
            v.skip(item["what"], item["why"])
        return v
