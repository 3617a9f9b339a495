"""Optimization profiles: the recipe's ranges per named axis, mapped onto each graph input.

The exporter writes a symbolic name (dim_param) on every dynamic dimension. A profile in the
recipe bounds each name once; here every graph input gets its (min, opt, max) shapes by
looking its dims up, with derived axes (total_sequence = past_sequence + sequence) summed.
Pure Python over the ONNX graph's declared shapes: no TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from ..axes import DERIVED_AXES
from ..config import Strict
from ..errors import RecipeError


class AxisRange(Strict):
    """Sizes one named dynamic axis takes in an optimization profile."""

    min: int = Field(ge=0)
    opt: int = Field(ge=0)
    max: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> AxisRange:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"needs min <= opt <= max, got min {self.min}, opt {self.opt}, max {self.max}")
        return self


class TrtProfile(Strict):
    """One TensorRT optimization profile: a range for each named dynamic axis declared at export."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
    axes: dict[str, AxisRange] = Field(min_length=1)

    @model_validator(mode="after")
    def _axes(self) -> TrtProfile:
        from ..axes import DERIVED_AXES, EXPORTED_AXES, REQUIRED_AXES, ZERO_ALLOWED

        for axis, rng in self.axes.items():
            if axis in DERIVED_AXES:
                parts = " + ".join(DERIVED_AXES[axis])
                raise ValueError(f"profile '{self.name}': axis '{axis}' is derived ({parts}); remove it and give "
                                 f"{' and '.join(DERIVED_AXES[axis])}")
            if axis not in EXPORTED_AXES:
                raise ValueError(f"profile '{self.name}': axis '{axis}' is not declared at export; the exporter "
                                 f"declares {', '.join(a for a in EXPORTED_AXES if a not in DERIVED_AXES)}")
            if axis not in ZERO_ALLOWED and rng.min < 1:
                raise ValueError(f"profile '{self.name}': axis '{axis}' needs min >= 1, got {rng.min}")
        missing = [a for a in REQUIRED_AXES if a not in self.axes]
        if missing:
            raise ValueError(f"profile '{self.name}': no range for {', '.join(missing)}; every profile bounds "
                             f"{', '.join(REQUIRED_AXES)} (and past_sequence for a decoder)")
        return self



Dim = int | str | None  # fixed size, symbolic name, or unknown
Shape = tuple[int, ...]


@dataclass(frozen=True)
class GraphInput:
    name: str
    dims: tuple[Dim, ...]
    dtype: str  # ONNX element type name, e.g. FLOAT, INT64


@dataclass(frozen=True)
class InputShapes:
    min: Shape
    opt: Shape
    max: Shape


@dataclass(frozen=True)
class DerivedProfile:
    name: str
    axes: dict[str, tuple[int, int, int]]  # every axis, derived ones included
    inputs: dict[str, InputShapes]

    def to_dict(self) -> dict:
        return {"name": self.name, "axes": {a: list(r) for a, r in self.axes.items()},
                "inputs": {n: {"min": list(s.min), "opt": list(s.opt), "max": list(s.max)}
                           for n, s in self.inputs.items()}}


def graph_inputs(model_path: Path) -> list[GraphInput]:
    """Declared inputs of an ONNX graph (initializers excluded), read without its weights."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return graph_inputs_of(model.graph)


def graph_inputs_of(graph) -> list[GraphInput]:
    return [_value_info(v) for v in _real_inputs(graph)]


def graph_outputs_of(graph) -> list[GraphInput]:
    return [_value_info(v) for v in graph.output]


def _real_inputs(graph):
    inits = {i.name for i in graph.initializer}
    return [v for v in graph.input if v.name not in inits]


def _value_info(value) -> GraphInput:
    import onnx

    tensor = value.type.tensor_type
    dims: list[Dim] = []
    for d in tensor.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return GraphInput(value.name, tuple(dims), onnx.TensorProto.DataType.Name(tensor.elem_type))


def axis_ranges(profile: TrtProfile) -> dict[str, tuple[int, int, int]]:
    """The profile's (min, opt, max) per axis, with derived axes added where all their parts are given."""
    ranges = {a: (r.min, r.opt, r.max) for a, r in profile.axes.items()}
    for axis, parts in DERIVED_AXES.items():
        if all(p in ranges for p in parts):
            ranges[axis] = tuple(sum(ranges[p][i] for p in parts) for i in range(3))  # type: ignore[assignment]
    return ranges


def derive_profile(profile: TrtProfile, inputs: list[GraphInput], where: str = "") -> DerivedProfile:
    """Shapes for every dynamic graph input; a RecipeError names any axis the two disagree on."""
    ranges = axis_ranges(profile)
    used: set[str] = set()
    shapes: dict[str, InputShapes] = {}
    prefix = f"{where}: " if where else ""
    for inp in inputs:
        if all(isinstance(d, int) for d in inp.dims):
            continue  # static input: TensorRT needs no profile entry
        lo: list[int] = []
        mid: list[int] = []
        hi: list[int] = []
        for i, dim in enumerate(inp.dims):
            if isinstance(dim, int):
                lo.append(dim)
                mid.append(dim)
                hi.append(dim)
                continue
            if dim is None:
                raise RecipeError(f"{prefix}graph input {inp.name} has an unnamed dynamic dimension {i}; "
                                  "re-export the model so every dynamic axis carries a name")
            if dim not in ranges:
                parts = DERIVED_AXES.get(dim)
                missing = [a for a in parts if a not in ranges] if parts else [dim]
                via = f" through {dim} (= {' + '.join(parts)})" if parts else ""
                raise RecipeError(f"{prefix}profile '{profile.name}' gives no range for axis '{missing[0]}', which "
                                  f"graph input {inp.name} uses{via} (dimension {i}); add it to the profile's axes")
            used.update(DERIVED_AXES.get(dim, (dim,)))
            low, opt, high = ranges[dim]
            lo.append(low)
            mid.append(opt)
            hi.append(high)
        shapes[inp.name] = InputShapes(tuple(lo), tuple(mid), tuple(hi))
    given = set(profile.axes)
    unused = sorted(given - used)
    if unused:
        declared = sorted({d for i in inputs for d in i.dims if isinstance(d, str)})
        raise RecipeError(f"{prefix}profile '{profile.name}' bounds {', '.join(unused)}, which this graph does not "
                          f"declare (its dynamic axes: {', '.join(declared) or 'none'})")
    return DerivedProfile(profile.name, ranges, shapes)


def derive_profiles(profiles: tuple[TrtProfile, ...] | list[TrtProfile], inputs: list[GraphInput],
                    where: str = "") -> list[DerivedProfile]:
    return [derive_profile(p, inputs, where) for p in profiles]


def check_decoder_axes(profiles, task: str, where: str = "") -> None:
    """Before any graph exists: a decoder graph also has past_sequence, so every profile must bound it."""
    if task != "causal-lm":
        return
    prefix = f"{where}: " if where else ""
    for p in profiles:
        if "past_sequence" not in p.axes:
            raise RecipeError(f"{prefix}profile '{p.name}' gives no range for past_sequence, which a decoder "
                              "graph declares on every past_key_values input (min 0 for a prefill profile)")


def to_polygraphy(derived: list[DerivedProfile]) -> list:
    """Polygraphy Profile objects, one per derived profile (constructs without TensorRT)."""
    from polygraphy.backend.trt import Profile

    out = []
    for d in derived:
        profile = Profile()
        for name, s in d.inputs.items():
            profile.add(name, min=s.min, opt=s.opt, max=s.max)
        out.append(profile)
    return out


def profile_for(derived: list[DerivedProfile], shapes: dict[str, Shape]) -> int | None:
    """Index of the first profile whose ranges hold every given input shape (None if none does)."""
    for index, d in enumerate(derived):
        if all(name in d.inputs and all(lo <= v <= hi for v, lo, hi in zip(shape, d.inputs[name].min,
                                                                                d.inputs[name].max))
               for name, shape in shapes.items()):
            return index
    return None
