"""simplify: constant folding and graph clean-up with onnxslim or onnxsim (or none).

The simplifier's own checks are not trusted (onnxsim has been seen to corrupt graphs while
its check passed): the result goes through the same verification as the export.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ..cache import Entry
from ..errors import StageError
from .base import Stage, Verification
from .export import verify_with_engine_threads

PROTOBUF_LIMIT = 2 * 1024**3


def link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def copy_onnx(src_dir: Path, dest_dir: Path) -> None:
    for name in ("model.onnx", "model.onnx.data"):
        if (src_dir / name).is_file():
            link_or_copy(src_dir / name, dest_dir / name)


def onnx_bytes(folder: Path) -> int:
    return sum((folder / n).stat().st_size for n in ("model.onnx", "model.onnx.data") if (folder / n).is_file())


def save_model(proto, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


class SimplifyStage(Stage):
    name = "simplify"
    version = 1

    @property
    def tools(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("onnx",) + ((self.spec.tool,) if self.spec.tool != "none" else ())

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        import onnx

        src = parent.file("model.onnx")
        external = parent.file("model.onnx.data").is_file()
        before = onnx.load(str(src), load_external_data=False)
        nodes_before = len(before.graph.node)
        notes: list[str] = []
        if self.spec.tool == "none":
            copy_onnx(parent.path, out)
            proto = before
        elif self.spec.tool == "onnxsim" and onnx_bytes(parent.path) >= PROTOBUF_LIMIT:
            notes.append("onnxsim skipped: it cannot hold a model over 2 GB in memory; the graph is unchanged")
            copy_onnx(parent.path, out)
            proto = before
        else:
            model = onnx.load(str(src))
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
                    raise StageError(f"{self.spec.tool} failed on {src}: {exc}") from exc
            save_model(proto, out / "model.onnx", external)
        shutil.copy2(parent.file("io.json"), out / "io.json")
        return {"io": parent.meta["stage_meta"]["io"], "tool": self.spec.tool, "nodes_before": nodes_before,
                "nodes": len(proto.graph.node), "notes": notes}

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        v = verify_with_engine_threads(self, out / "model.onnx", meta["io"], parent.file("model.onnx"))
        v.metrics["nodes_before"] = meta["nodes_before"]
        v.metrics["nodes_after"] = meta["nodes"]
        v.notes.extend(meta["notes"])
        return v

    def describe(self, entry: Entry) -> str:
        return str(entry.file("model.onnx"))
