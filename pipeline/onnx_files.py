"""ONNX model files in an artifact folder: saving with external data, linking, sizes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

MODEL = "model.onnx"
EXTERNAL_DATA = "model.onnx.data"
PROTOBUF_LIMIT = 2 * 1024**3  # one serialized protobuf message cannot exceed 2 GB


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link `src` to `dest` where the file system allows it, else copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def copy_data_file(src: Path, dest: Path) -> None:
    """A real copy of an external-data file: onnx.load refuses one with several hard links (its guard against
    hard-link attacks), so the weights of an artifact that later stages load are never linked."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def copy_onnx(src_dir: Path, dest_dir: Path) -> None:
    if (src_dir / MODEL).is_file():
        link_or_copy(src_dir / MODEL, dest_dir / MODEL)
    if (src_dir / EXTERNAL_DATA).is_file():
        copy_data_file(src_dir / EXTERNAL_DATA, dest_dir / EXTERNAL_DATA)


def onnx_bytes(folder: Path) -> int:
    return sum((folder / n).stat().st_size for n in (MODEL, EXTERNAL_DATA) if (folder / n).is_file())


def save_model(proto: Any, path: Path, external: bool) -> None:
    """Save a ModelProto; with `external`, every initializer over 1 KB goes to `<name>.data` beside it."""
    import onnx

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def replace_graph(model: Any, nodes: list[Any], replaced: set[str], added: list[Any]) -> None:
    """Give `model` (a ModelProto) the node list `nodes`: initializers named in `replaced` that no node reads
    any more are dropped, and `added` are appended."""
    still_used = {i for n in nodes for i in n.input}
    keep = [i for i in model.graph.initializer if i.name not in replaced or i.name in still_used]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + added)
