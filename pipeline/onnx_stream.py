"""Rewriting an ONNX graph's weights one tensor at a time, never holding them all.

`onnx.load` of a 3 GB graph holds 3 GB; a rewrite that makes a new tensor per weight (smoothed, INT8)
holds both until it saves, and saving with external data holds them again while it converts. Here the
graph is loaded without its weights (`GraphWeights`), each weight is read when it is needed (a memory
map of the weights file: the pages are the file's, not the heap's), and each new tensor is written to
the destination's weights file as it is made (`WeightWriter`), the proto keeping only its offset. The
weights the rewrite leaves alone are copied file to file when the graph is saved. Peak memory is the
graph's structure plus the few tensors being worked on.

Offsets in the written file are aligned to 4 KiB, so a reader may map each tensor directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .onnx_files import EXTERNAL_DATA, MODEL

ALIGN = 4096
INLINE_LIMIT = 1024  # tensors up to this many bytes stay in the proto, as onnx's own save does


def _external_fields(tensor: Any) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_external(tensor: Any) -> bool:
    from onnx import TensorProto

    return tensor.data_location == TensorProto.EXTERNAL


class GraphWeights:
    """A graph's ModelProto without its weights, and its weights read on demand."""

    def __init__(self, path: Path) -> None:
        import onnx

        self.path = Path(path)
        self.model = onnx.load(str(self.path), load_external_data=False)
        self._maps: dict[str, np.memmap] = {}

    def initializers(self) -> dict[str, Any]:
        return {i.name: i for i in self.model.graph.initializer}

    def raw(self, tensor: Any) -> memoryview | bytes:
        """The tensor's bytes: a view of the mapped weights file, or the proto's own bytes."""
        if not is_external(tensor):
            return tensor.raw_data
        fields = _external_fields(tensor)
        location = fields["location"]
        if location not in self._maps:
            self._maps[location] = np.memmap(self.path.parent / location, dtype=np.uint8, mode="r")
        offset = int(fields.get("offset", 0))
        length = int(fields["length"]) if "length" in fields else len(self._maps[location]) - offset
        return memoryview(self._maps[location])[offset:offset + length]  # type: ignore[arg-type]

    def array(self, tensor: Any) -> np.ndarray:
        """The tensor as a (read-only where mapped) numpy array; only its own pages are read."""
        from onnx import helper, numpy_helper

        if not is_external(tensor) and not tensor.raw_data:
            return numpy_helper.to_array(tensor)  # typed fields (float_data, ...), small by construction
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.frombuffer(self.raw(tensor), dtype=dtype).reshape(tuple(tensor.dims))

    def close(self) -> None:
        self._maps.clear()


class WeightWriter:
    """Writes tensors to `folder/model.onnx.data` as they are made; the protos it returns point there."""

    def __init__(self, folder: Path, external: bool, source: GraphWeights | None = None) -> None:
        self.folder = Path(folder)
        self.external = external
        self.folder.mkdir(parents=True, exist_ok=True)
        if source is not None and source.path.parent.resolve() == self.folder.resolve():
            raise ValueError(f"{self.folder}: writing a graph's weights over the file they are read from")
        self._file = open(self.folder / EXTERNAL_DATA, "wb") if external else None  # noqa: SIM115
        self._offset = 0
        self._written: set[str] = set()

    def _append(self, data: bytes | memoryview) -> int:
        assert self._file is not None
        pad = -self._offset % ALIGN
        if pad:
            self._file.write(b"\0" * pad)
            self._offset += pad
        start = self._offset
        self._file.write(data)
        self._offset += len(data)
        return start

    def _point(self, tensor: Any, start: int, length: int) -> None:
        from onnx import TensorProto

        del tensor.external_data[:]
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", EXTERNAL_DATA), ("offset", str(start)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    def tensor(self, array: np.ndarray, name: str) -> Any:
        """A TensorProto named `name` holding `array`; past INLINE_LIMIT bytes its data is already on disk."""
        from onnx import numpy_helper

        array = np.ascontiguousarray(array)
        if not self.external or array.nbytes <= INLINE_LIMIT:
            return numpy_helper.from_array(array, name)
        proto = numpy_helper.from_array(array[:0].reshape((0,)), name)  # dtype only; no copy of the data
        del proto.dims[:]
        proto.dims.extend(array.shape)
        data = memoryview(array).cast("B")  # type: ignore[arg-type]
        self._point(proto, self._append(data), array.nbytes)
        self._written.add(name)
        return proto

    def carry(self, tensor: Any, source: GraphWeights) -> None:
        """Make `tensor` (an initializer of the graph being written, unchanged) point into this file."""
        from onnx import TensorProto

        if not self.external:
            if is_external(tensor):
                tensor.raw_data = bytes(source.raw(tensor))
                del tensor.external_data[:]
                tensor.data_location = TensorProto.DEFAULT
            return
        if not is_external(tensor) and len(tensor.raw_data) <= INLINE_LIMIT:
            return
        data = source.raw(tensor)
        self._point(tensor, self._append(data), len(data))

    def save(self, model: Any, source: GraphWeights) -> Path:
        """Carry every initializer not written here, then save the graph (its structure only) as model.onnx."""
        import onnx

        for init in model.graph.initializer:
            if init.name not in self._written:
                self.carry(init, source)
        self.close()
        path = self.folder / MODEL
        onnx.save_model(model, str(path))
        if not self.external:
            (self.folder / EXTERNAL_DATA).unlink(missing_ok=True)
        return path

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
