"""Recipe schema and loader.

A recipe is YAML validated by strict pydantic models (unknown fields are errors). Each stage's
section is validated by the config its stage defines (pipeline/stages/*.py, `...Config`); this
module assembles their union from the stage registry, holds the root `Recipe` with the rules
that span stages, and resolves each stage's verification thresholds (pipeline/verify/policy.py).
Errors name the file, the line where YAML gives one, the field and what is allowed
(pipeline/recipe_errors.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .config import Strict
from .errors import RecipeError
from .recipe_errors import node_line, validation_messages
from .registry import STAGE_ORDER, recipe_stage_classes
from .verify.policy import Policy, onnx_stage_policy
from .verify.settings import LatencySpec, VerifySpec

__all__ = ["SCHEMA_VERSION", "STAGE_ORDER", "LatencySpec", "LoadedRecipe", "ModelSpec", "Recipe", "VerifySpec",
           "load_recipe", "parse_recipe", "stage_config"]

SCHEMA_VERSION = 1


class ModelSpec(Strict):
    path: str = Field(description="Local Hugging Face model folder, relative to the recipe file, or "
                                  "'package:<module>/<folder>' for a model shipped in an installed package.")
    trust_remote_code: bool = False


def _engine_backend(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("backend", "onnxruntime")
    return getattr(value, "backend", None)


def _stage_union() -> Any:
    """The discriminated union of every registered stage's config; an engine's configs are told apart
    by `backend`."""
    members: list[Any] = []
    backends: dict[str, list[Any]] = {}
    for key, cls in recipe_stage_classes().items():
        name, _, backend = key.partition(":")
        if backend:
            backends.setdefault(name, []).append(Annotated[cls.Config, Tag(backend)])
        else:
            members.append(cls.Config)
    for tagged in backends.values():
        members.append(Annotated[Union[tuple(tagged)], Discriminator(_engine_backend)])
    return Annotated[Union[tuple(members)], Field(discriminator="type")]


if TYPE_CHECKING:  # assembled at run time from the registry: to a type checker, any stage config
    StageSpec = Any
else:
    StageSpec = _stage_union()
_CONFIGS = {key: cls.Config for key, cls in recipe_stage_classes().items()}


def stage_config(key: str) -> type:
    """The config class of a registered stage ('export', 'engine:tensorrt', ...)."""
    return _CONFIGS[key]


class Recipe(Strict):
    schema_version: Literal[1]
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model: ModelSpec
    stages: tuple[StageSpec, ...] = Field(min_length=1)
    verify: VerifySpec = VerifySpec()

    @model_validator(mode="before")
    @classmethod
    def _tensorrt_kv_cache(cls, data: Any) -> Any:
        """A TensorRT engine's graph keeps its KV cache in FP16 unless the export stage says otherwise."""
        if not isinstance(data, dict) or not isinstance(data.get("stages"), list | tuple):
            return data
        stages = list(data["stages"])
        tensorrt = any(isinstance(s, dict) and s.get("type") == "engine" and s.get("backend") == "tensorrt"
                       for s in stages)
        for i, s in enumerate(stages):
            if tensorrt and isinstance(s, dict) and s.get("type") == "export" and s.get("kv_cache_dtype") is None:
                stages[i] = {**s, "kv_cache_dtype": "float16"}
        return {**data, "stages": stages}

    @model_validator(mode="after")
    def _stage_order(self) -> Recipe:
        names = [s.type for s in self.stages]
        for name in set(names):
            if names.count(name) > 1:
                raise ValueError(f"stage '{name}' appears {names.count(name)} times; each stage may appear once")
        positions = [STAGE_ORDER.index(n) for n in names]
        if positions != sorted(positions):
            raise ValueError(f"stages must run in the order {' -> '.join(STAGE_ORDER)}; got {' -> '.join(names)}")
        precision, quantize, export = self.stage("precision"), self.stage("quantize"), self.stage("export")
        if quantize is not None and not quantize.exportable and len(names) > 1:
            raise ValueError(
                f"method {quantize.method} quantizes for the PyTorch runtime: its NF4/FP4 codebooks and LLM.int8() "
                f"outlier split have no ONNX operators, so it cannot be followed by {', '.join(names[1:])}. To ship "
                "an ONNX engine choose method gptq, awq or rtn (weight-only, lowered by precision mode int4) or "
                "smoothquant (W8A8, then precision mode int8-qdq); to ship a bitsandbytes checkpoint keep only "
                "the quantize stage")
        if "export" not in names and names != ["quantize"]:
            raise ValueError("a recipe needs an 'export' stage (every later stage works on the ONNX model); only a "
                             "recipe whose single stage is quantize ships a PyTorch checkpoint without it")
        if precision is not None and precision.mode == "int4":
            if quantize is None or not quantize.weight_only or quantize.bits != 4:
                raise ValueError("precision mode int4 lowers the integers of a 4-bit weight-only quantize stage "
                                 "(rtn, gptq or awq); add '- type: quantize' with one of those methods and bits: 4 "
                                 "before export, or choose int8-dynamic")
            if precision.int4_format == "dq" and export.opset < 21:
                raise ValueError(f"int4_format dq needs INT4 DequantizeLinear (opset 21); export.opset is "
                                 f"{export.opset}: set it to 21 or more")
        return self

    @model_validator(mode="after")
    def _engine_and_package(self) -> Recipe:
        engine, precision, package = self.stage("engine"), self.stage("precision"), self.stage("package")
        if package is not None and engine is None:
            raise ValueError("a package stage packages an engine; add an 'engine' stage before it")
        if getattr(engine, "backend", None) == "tensorrt":
            if precision is not None and precision.mode == "int8-dynamic":
                raise ValueError("engine backend tensorrt cannot run int8-dynamic graphs (MatMulInteger, "
                                 "DynamicQuantizeLinear); use precision mode int8-qdq with target: tensorrt")
            if precision is not None and precision.mode == "int8-qdq" and precision.target != "tensorrt":
                raise ValueError("engine backend tensorrt needs signed symmetric Q/DQ: set the precision stage's "
                                 "target: tensorrt")
            if precision is not None and precision.mode == "int4" and precision.int4_format != "dq":
                raise ValueError("engine backend tensorrt cannot parse MatMulNBits (an ONNX Runtime op): set the "
                                 "precision stage's int4_format: dq")
            if package is not None and package.max_batch_size > engine.max_batch():
                raise ValueError(f"package.max_batch_size {package.max_batch_size} exceeds the largest batch any "
                                 f"TensorRT profile accepts ({engine.max_batch()})")
        return self

    def stage(self, name: str) -> Any:
        return next((s for s in self.stages if s.type == name), None)

    def chain(self, name: str) -> list[Any]:
        """The stage configs up to and including `name`, in order."""
        names = [s.type for s in self.stages]
        if name not in names:
            raise KeyError(f"recipe {self.name} has no stage {name!r}")
        return list(self.stages[: names.index(name) + 1])

    def policy_for(self, name: str) -> Policy:
        """The thresholds an ONNX stage is held to, with where each came from (pipeline/verify/policy.py).
        A quantize stage's gates are its own (`QuantizeConfig.gates`)."""
        return onnx_stage_policy(self.verify.thresholds, self.chain(name))


class LoadedRecipe(BaseModel):
    """A validated recipe plus where it came from."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    recipe: Recipe
    path: Path

    @property
    def model_path(self) -> Path:
        raw = self.recipe.model.path
        if raw.startswith(PACKAGE_PREFIX):
            return package_path(raw, self.path)
        p = Path(raw)
        return p if p.is_absolute() else (self.path.parent / p).resolve()


PACKAGE_PREFIX = "package:"


def package_path(raw: str, recipe_path: Path) -> Path:
    """'package:<module>/<sub/path>': a model folder shipped inside an installed Python package."""
    import importlib.util

    from .errors import ModelError

    module, _, sub = raw[len(PACKAGE_PREFIX):].partition("/")
    try:
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{recipe_path}: model.path {raw!r}: Python package {module!r} is not installed; "
                         f"install it (pip install {module.replace('_', '-')}) or give a folder path")
    root = Path(next(iter(spec.submodule_search_locations)))
    target = (root / sub).resolve()
    if root.resolve() not in (target, *target.parents):
        raise ModelError(f"{recipe_path}: model.path {raw!r} points outside the package")
    return target


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: a recipe is a YAML mapping with schema_version, name, model and stages; "
            f"got {type(data).__name__}"
        )
    version = data.get("schema_version")
    if version is not None and version != SCHEMA_VERSION:
        line = node_line(node, ("schema_version",))
        raise RecipeError(
            f"{source}:{line}: field 'schema_version': this enginewright reads schema_version {SCHEMA_VERSION}, "
            f"got {version!r}"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError("\n".join(validation_messages(exc, node, source))) from None


def load_recipe(path: str | Path) -> LoadedRecipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found; pass the path of a YAML recipe such as recipes/tiny-llama.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None
    return LoadedRecipe(recipe=parse_recipe(text, str(path)), path=path.resolve())
