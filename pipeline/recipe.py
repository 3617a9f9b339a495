"""Recipe schema and loader.

A recipe is YAML validated by strict pydantic models (unknown fields are errors). Every
error names the file, the line where YAML gives one, the field and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from .errors import RecipeError

SCHEMA_VERSION = 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    path: str = Field(description="Local Hugging Face model folder, relative to the recipe file, or "
                                  "'package:<module>/<folder>' for a model shipped in an installed package.")
    trust_remote_code: bool = False


class ExportStage(Strict):
    type: Literal["export"]
    opset: int = Field(default=18, ge=17, le=23)
    external_data_threshold_mb: float = Field(
        default=1024.0, gt=0, description="Weights above this size go to an external data file."
    )


class SimplifyStage(Strict):
    type: Literal["simplify"]
    tool: Literal["onnxslim", "onnxsim", "none"] = "onnxslim"


class StageVerify(Strict):
    """Per-stage verification thresholds; they hold for this stage and every later one."""

    min_cosine: float | None = Field(default=None, ge=-1, le=1)
    require_pair_ranking: bool | None = None
    prefill_atol: float | None = Field(default=None, gt=0)
    decode_atol: float | None = Field(default=None, gt=0)
    min_greedy_match: float | None = Field(default=None, ge=0, le=1)
    max_kl_mean: float | None = Field(default=None, gt=0)
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)


class CalibrationSpec(Strict):
    text: str = Field(default="pydoc:calib", description="pydoc:<split> or a UTF-8 text file (relative to the recipe).")
    samples: int = Field(default=16, ge=1, le=4096)
    seq_len: int = Field(default=64, ge=8, le=8192)
    seed: int = 0
    method: Literal["minmax", "percentile", "entropy"] = "minmax"


# Thresholds from a precision stage on: they replace the verify section's for that stage and
# every later one; the precision stage's own `verify:` overrides them. Logit differences are
# not checked for INT8: KL and top-1 (decoders) or embedding cosine (encoders) are.
PRECISION_VERIFY_DEFAULTS: dict[str, dict[str, float | None]] = {
    "fp16": {"prefill_atol": 5e-2, "decode_atol": 5e-2, "min_greedy_match": 0.5, "max_kl_mean": 1e-3,
             "min_top1_agreement": 0.97, "min_cosine": 0.999},
    "int8-dynamic": {"prefill_atol": None, "decode_atol": None, "min_greedy_match": 0.0, "max_kl_mean": 0.05,
                     "min_top1_agreement": 0.85, "min_cosine": 0.98},
    "int8-qdq": {"prefill_atol": None, "decode_atol": None, "min_greedy_match": 0.0, "max_kl_mean": 0.05,
                 "min_top1_agreement": 0.85, "min_cosine": 0.98},
    # int4 lowers the quantize stage's own integers: checked against the quantized PyTorch model
    "int4": {"prefill_atol": 1e-3, "decode_atol": 1e-3, "min_greedy_match": 0.9, "max_kl_mean": 1e-4,
             "min_top1_agreement": 0.99, "min_cosine": 0.999},
}


class PrecisionStage(Strict):
    type: Literal["precision"]
    mode: Literal["fp16", "int8-dynamic", "int8-qdq", "int4"]
    int4_format: Literal["matmulnbits", "dq"] = Field(
        default="matmulnbits",
        description="int4: com.microsoft.MatMulNBits (ONNX Runtime) or blocked DequantizeLinear (opset 21, TensorRT).")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        default=0, description="MatMulNBits compute type: 0 = as the input (exact), 4 = int8 (faster, approximate).")
    target: Literal["cpu", "tensorrt"] = Field(
        default="cpu", description="INT8 activations: unsigned on CPU (fast kernels), signed symmetric for TensorRT.")
    per_channel: bool = True
    quantize_lm_head: bool = False
    keep_io_fp32: bool = True
    fp32_op_types: tuple[str, ...] = Field(
        default=("RMSNormalization", "SimplifiedLayerNormalization", "LayerNormalization", "Softmax", "Pow",
                 "ReduceMean", "Sqrt", "Reciprocal"),
        description="FP16: op types kept in FP32 (norms, softmax).")
    calibration: CalibrationSpec | None = None
    verify: StageVerify | None = None

    @model_validator(mode="after")
    def _calibration(self) -> "PrecisionStage":
        if self.mode == "int4" and self.calibration is not None:
            raise ValueError("mode int4 lowers the quantize stage's integers and does not calibrate; "
                             "remove the calibration section")
        if self.mode == "int8-qdq" and self.calibration is None:
            raise ValueError("mode int8-qdq needs a calibration section (text, samples, seq_len, seed, method)")
        if self.mode != "int8-qdq" and self.calibration is not None:
            raise ValueError(f"mode {self.mode} does not calibrate; remove the calibration section")
        return self


class QuantizeVerify(Strict):
    """Quality gates of the quantize stage, against the original model on held-out text."""

    max_kl_mean: float | None = Field(default=None, gt=0)
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    max_perplexity_increase: float | None = Field(default=None, gt=0,
                                                  description="Relative: 0.05 allows perplexity 5% above the original.")


# Gates a quantize stage starts from, by weight bits (its own verify section overrides them).
QUANTIZE_VERIFY_DEFAULTS: dict[int | str, dict[str, float]] = {
    4: {"max_kl_mean": 0.2, "min_top1_agreement": 0.8, "max_perplexity_increase": 0.5},
    8: {"max_kl_mean": 0.01, "min_top1_agreement": 0.97, "max_perplexity_increase": 0.05},
    # weights and activations in INT8 (activations static, per tensor)
    "w8a8": {"max_kl_mean": 0.03, "min_top1_agreement": 0.93, "max_perplexity_increase": 0.15},
}


class QuantizeCalibration(Strict):
    """Calibration windows for the quantize stage (the text's content hash is part of the cache key)."""

    text: str = Field(default="pydoc:calib", description="pydoc:<split> or a UTF-8 text file (relative to the recipe).")
    samples: int = Field(default=64, ge=1, le=4096)
    seq_len: int = Field(default=128, ge=8, le=8192)
    seed: int = 0


# Which weight bits each method takes, and whether it calibrates.
QUANTIZE_METHODS: dict[str, dict[str, Any]] = {
    "rtn": {"bits": (4, 8), "calibrates": False},
    "gptq": {"bits": (4, 8), "calibrates": True},
    "awq": {"bits": (4,), "calibrates": True},
    "smoothquant": {"bits": (8,), "calibrates": True},
    "bitsandbytes": {"bits": (4, 8), "calibrates": False},
}


class QuantizeStage(Strict):
    type: Literal["quantize"]
    method: Literal["rtn", "gptq", "awq", "smoothquant", "bitsandbytes"] = Field(
        description="rtn: round-to-nearest weight-only (the reference); gptq, awq: weight-only with calibration "
                    "(GPT-QModel); smoothquant: W8A8 INT8 with smoothing; bitsandbytes: NF4/FP4/LLM.int8() "
                    "for the PyTorch runtime only.")
    bits: Literal[4, 8] | None = Field(default=None, description="Weight bits; default 4 (smoothquant: 8).")
    group_size: int | None = Field(
        default=None, description="Input channels per scale; -1: one scale per output channel. "
                                  "Default 128 for 4 bits, -1 for 8 bits.")
    symmetric: bool | None = Field(default=None, description="Default: asymmetric for 4 bits, symmetric for 8 bits.")
    exclude: tuple[str, ...] = Field(default=("lm_head",), description="Linear layers (name suffixes) kept in FP32.")
    calibration: QuantizeCalibration | None = Field(default=None, description="gptq, awq, smoothquant.")
    damp_percent: float | None = Field(default=None, gt=0, lt=1, description="gptq: Hessian dampening.")
    alpha: float | None = Field(default=None, ge=0, le=1,
                                description="smoothquant: migration strength (0: none, 1: all to the weights), default "
                                            "0.5; null: no smoothing at all (plain W8A8, for comparison).")
    bnb_type: Literal["nf4", "fp4", "int8"] | None = Field(default=None, description="bitsandbytes: nf4 (default), "
                                                                                     "fp4 or int8 (LLM.int8()).")
    double_quant: bool | None = Field(default=None, description="bitsandbytes 4-bit: quantize the scales too.")
    verify: QuantizeVerify | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("method") not in QUANTIZE_METHODS:
            return data
        data = dict(data)
        method = data["method"]
        if method == "bitsandbytes":
            kind = data.setdefault("bnb_type", "nf4")
            data.setdefault("bits", 8 if kind == "int8" else 4)
            if kind != "int8":
                data.setdefault("double_quant", True)
        data.setdefault("bits", 8 if method == "smoothquant" else 4)
        bits = data["bits"]
        data.setdefault("group_size", 128 if bits == 4 and method != "bitsandbytes" else -1)
        data.setdefault("symmetric", bits == 8)
        if method == "smoothquant":
            data.setdefault("alpha", 0.5)  # an explicit null stays: plain W8A8 with the same calibration
        if QUANTIZE_METHODS[method]["calibrates"]:
            data.setdefault("calibration", {})
        return data

    @model_validator(mode="after")
    def _check(self) -> "QuantizeStage":
        method, allowed = self.method, QUANTIZE_METHODS[self.method]
        if self.bits not in allowed["bits"]:
            raise ValueError(f"method {method} quantizes to {' or '.join(map(str, allowed['bits']))} bits, "
                             f"not {self.bits}")
        if self.group_size != -1 and self.group_size < 2:
            raise ValueError(f"group_size must be -1 (per output channel) or at least 2, got {self.group_size}")
        if self.calibration is not None and not allowed["calibrates"]:
            raise ValueError(f"method {method} does not calibrate; remove the calibration section")
        only = {"alpha": "smoothquant", "damp_percent": "gptq", "bnb_type": "bitsandbytes",
                "double_quant": "bitsandbytes"}
        for name, owner in only.items():
            if getattr(self, name) is not None and method != owner:
                raise ValueError(f"{name} is a {owner} parameter; method {method} does not take it")
        if method == "smoothquant" and (self.group_size != -1 or not self.symmetric):
            raise ValueError("smoothquant quantizes weights symmetric per output channel: use group_size -1 "
                             "and symmetric true (or leave both out)")
        if method == "awq" and (self.group_size == -1 or self.symmetric):
            raise ValueError("awq here is asymmetric per group (the GEMM layout): set a group_size such as 128 "
                             "and symmetric false (or leave both out)")
        if method == "bitsandbytes":
            if (self.bits == 8) != (self.bnb_type == "int8"):
                raise ValueError(f"bnb_type {self.bnb_type} is {4 if self.bits == 8 else 8}-bit; bits says "
                                 f"{self.bits}: leave bits out")
            if "group_size" in self.model_fields_set and self.group_size != -1:
                raise ValueError("bitsandbytes fixes its own block size (64 for 4-bit); remove group_size")
        if method == "gptq" and self.bits == 8 and self.group_size != -1:
            raise ValueError("gptq 8-bit is per output channel here: group_size -1")
        return self

    def gates(self) -> dict[str, float | None]:
        w8a8 = self.method == "smoothquant"
        gates: dict[str, float | None] = dict(QUANTIZE_VERIFY_DEFAULTS["w8a8" if w8a8 else self.bits])
        if self.verify is not None:
            gates.update({k: getattr(self.verify, k) for k in self.verify.model_fields_set})
        return gates

    @property
    def exportable(self) -> bool:
        return self.method != "bitsandbytes"

    @property
    def weight_only(self) -> bool:
        """Integers the precision stage can lower (qweight, scales, zeros per layer)."""
        return self.method in ("rtn", "gptq", "awq")


class OrtEngineStage(Strict):
    type: Literal["engine"]
    backend: Literal["onnxruntime"] = "onnxruntime"
    execution_provider: Literal["CPUExecutionProvider"] = "CPUExecutionProvider"
    graph_optimization_level: Literal["basic", "extended", "all"] = "all"
    intra_op_threads: int = Field(default=1, ge=0, description="0 lets ONNX Runtime use every core.")
    allow_spinning: bool = Field(default=False, description="Thread spinning; off is faster on shared cores.")
    fuse_attention: bool = Field(
        default=True, description="Rewrite each layer's opset-23 attention (head reshapes, KV concat, grouped-query "
                                  "repeat) into one 3-D Attention node with its KV cache; verified like any build.")


class AxisRange(Strict):
    """Sizes one named dynamic axis takes in an optimization profile."""

    min: int = Field(ge=0)
    opt: int = Field(ge=0)
    max: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AxisRange":
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"needs min <= opt <= max, got min {self.min}, opt {self.opt}, max {self.max}")
        return self


class TrtProfile(Strict):
    """One TensorRT optimization profile: a range for each named dynamic axis declared at export."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
    axes: dict[str, AxisRange] = Field(min_length=1)

    @model_validator(mode="after")
    def _axes(self) -> "TrtProfile":
        from .axes import DERIVED_AXES, EXPORTED_AXES, REQUIRED_AXES, ZERO_ALLOWED

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


class TrtCompare(Strict):
    """How the TensorRT engine is checked against ONNX Runtime on the same feeds (GPU only)."""

    atol: float = Field(default=1e-2, gt=0)
    rtol: float = Field(default=1e-2, ge=0)
    outputs: Literal["logits", "all"] = Field(default="all", description="'all' compares the KV presents too.")
    latency: bool = True
    fp16_baseline: bool = Field(default=True, description="Time a PyTorch FP16 CUDA baseline beside the engine.")


class TensorRTEngineStage(Strict):
    type: Literal["engine"]
    backend: Literal["tensorrt"]
    profiles: tuple[TrtProfile, ...] = Field(min_length=1)
    builder_optimization_level: int = Field(default=3, ge=0, le=5)
    hardware_compatibility_level: Literal["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"] = Field(
        default="NONE", description="trt.HardwareCompatibilityLevel member, by name.")
    version_compatible: bool = Field(default=False, description="An engine later TensorRT versions can run.")
    exclude_lean_runtime: bool = False
    timing_cache: bool = Field(default=True, description="Reuse tactic timings per GPU and TensorRT version.")
    workspace_mb: int | None = Field(default=None, ge=1, description="trt.MemoryPoolType.WORKSPACE limit.")
    gpu_memory_gb: float | None = Field(
        default=None, gt=0, description="Memory of the target GPU, for plan's estimate where no GPU is visible.")
    compare: TrtCompare = TrtCompare()

    @model_validator(mode="after")
    def _options(self) -> "TensorRTEngineStage":
        names = [p.name for p in self.profiles]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"profile names must be unique; repeated: {', '.join(dupes)}")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise ValueError("exclude_lean_runtime needs version_compatible: true")
        return self

    def max_batch(self) -> int:
        return max(p.axes["batch"].max for p in self.profiles)


def _engine_backend(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("backend", "onnxruntime")
    return getattr(value, "backend", None)


EngineStageSpec = Annotated[
    Union[Annotated[OrtEngineStage, Tag("onnxruntime")], Annotated[TensorRTEngineStage, Tag("tensorrt")]],
    Discriminator(_engine_backend),
]


class DynamicBatching(Strict):
    max_queue_delay_microseconds: int = Field(default=100, ge=0)
    preferred_batch_size: tuple[int, ...] = ()


class PackageStage(Strict):
    """A Triton model repository for the engine, with a manifest of every file."""

    type: Literal["package"]
    format: Literal["triton"] = "triton"
    model_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                                   description="Folder name in the repository; the recipe name by default.")
    max_batch_size: int = Field(
        default=0, ge=0, description="0: Triton does not batch and dims include the batch axis; above 0: the "
                                     "batch axis must lead every input and output and is left out of dims.")
    dynamic_batching: DynamicBatching | None = None
    instance_count: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _batching(self) -> "PackageStage":
        if self.dynamic_batching is not None:
            if self.max_batch_size == 0:
                raise ValueError("dynamic_batching needs max_batch_size > 0 (Triton batches only models that "
                                 "declare a batch axis)")
            too_big = [b for b in self.dynamic_batching.preferred_batch_size if not 1 <= b <= self.max_batch_size]
            if too_big:
                raise ValueError(f"preferred_batch_size {too_big} must lie in 1..max_batch_size "
                                 f"({self.max_batch_size})")
        return self


StageSpec = Annotated[Union[QuantizeStage, ExportStage, SimplifyStage, PrecisionStage, EngineStageSpec,
                            PackageStage],
                      Field(discriminator="type")]

ENGINE_BACKENDS = ("onnxruntime", "tensorrt")

# Stages run in this order; each may appear at most once.
STAGE_ORDER = ("quantize", "export", "simplify", "precision", "engine", "package")


class LatencySpec(Strict):
    warmup: int = Field(default=2, ge=0)
    repeats: int = Field(default=5, ge=1)
    prompt_tokens: int = Field(default=32, ge=1)
    decode_tokens: int = Field(default=32, ge=2)


class VerifySpec(Strict):
    prefill_atol: float | None = Field(default=1e-4, gt=0, description="null: not checked")
    decode_atol: float | None = Field(default=1e-4, gt=0, description="null: not checked")
    greedy_tokens: int = Field(default=16, ge=1)
    min_greedy_match: float = Field(
        default=1.0, ge=0, le=1, description="Fraction of greedy tokens that must equal PyTorch's."
    )
    max_kl_mean: float | None = Field(default=None, gt=0, description="Mean KL(PyTorch || stage) on held-out text.")
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    min_cosine: float = Field(default=0.999, ge=-1, le=1,
                              description="Encoders: least cosine similarity of pooled embeddings to PyTorch's.")
    sentence_pairs: tuple[tuple[str, str], ...] = Field(
        default=(
            ("A man is playing a guitar on stage.", "Someone performs music with a guitar."),
            ("The cat sleeps on the warm windowsill.", "A kitten naps in the sun by the window."),
            ("Interest rates rose again this quarter.", "The central bank increased borrowing costs."),
            ("The train to the airport was delayed.", "A recipe for lemon cake with fresh berries."),
            ("Python lists can grow and shrink.", "The mountain trail was covered in snow."),
            ("He repaired the bicycle's flat tyre.", "She fixed the puncture on her bike."),
        ),
        min_length=2, description="Encoders: pairs whose similarity ranking must survive every stage.")
    require_pair_ranking: bool = Field(default=True, description="Encoders: fail if the pairs' ranking changes.")
    eval_text: str = "pydoc:eval"
    eval_windows: int = Field(default=4, ge=1, le=256)
    eval_window_tokens: int = Field(default=64, ge=8, le=8192)
    prompts: tuple[str, ...] = Field(
        default=(
            "The assert statement is a convenient way to insert debugging assertions",
            "A function definition defines a user-defined function object",
        ),
        min_length=2,
    )
    latency: LatencySpec = LatencySpec()


class Recipe(Strict):
    schema_version: Literal[1]
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model: ModelSpec
    stages: tuple[StageSpec, ...] = Field(min_length=1)
    verify: VerifySpec = VerifySpec()

    @model_validator(mode="after")
    def _stage_order(self) -> "Recipe":
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

    def stage(self, name: str):
        return next((s for s in self.stages if s.type == name), None)

    def verify_for(self, name: str) -> VerifySpec:
        """Thresholds for one stage: the verify section, then for each stage up to and including this
        one, in order, its precision mode's defaults and its own verify overrides."""
        spec = self.verify
        for stage in self.stages:
            if isinstance(stage, QuantizeStage):  # its gates are its own (QuantizeStage.gates)
                continue
            updates: dict[str, Any] = {}
            if isinstance(stage, PrecisionStage):
                updates.update(PRECISION_VERIFY_DEFAULTS[stage.mode])
            override = getattr(stage, "verify", None)
            if override is not None:
                updates.update({k: getattr(override, k) for k in override.model_fields_set})
            if updates:
                spec = spec.model_copy(update=updates)
            if stage.type == name:
                break
        return spec

    @model_validator(mode="after")
    def _engine_and_package(self) -> "Recipe":
        engine, precision, package = self.stage("engine"), self.stage("precision"), self.stage("package")
        if package is not None and engine is None:
            raise ValueError("a package stage packages an engine; add an 'engine' stage before it")
        if isinstance(engine, TensorRTEngineStage):
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


def _field_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop the discriminator tags pydantic inserts after a list index (stages.0.export.opset)."""
    out: list[Any] = []
    previous: Any = None
    for part in loc:
        tag, previous = previous, part
        if out and isinstance(out[-1], int) and isinstance(part, str) and part in STAGE_ORDER:
            continue
        if tag == "engine" and part in ENGINE_BACKENDS:  # the engine's backend tag
            continue
        out.append(part)
    return tuple(out)


def _node_line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at a field path, or of its nearest existing parent."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            nxt = node.value[part]
        if nxt is None:
            break
        node = nxt
        line = node.start_mark.line + 1
    return line


def _describe(err: dict[str, Any]) -> str:
    kind = err["type"]
    msg = err["msg"]
    if kind == "extra_forbidden":
        return "unknown field; remove it or check its spelling"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return msg.replace("Input should be", "must be")
    if kind == "union_tag_invalid" and err.get("ctx", {}).get("discriminator") == "_engine_backend()":
        return f"unknown engine backend {err['ctx'].get('tag')!r}; allowed: {', '.join(ENGINE_BACKENDS)}"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"unknown stage type {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return f"a stage needs a 'type' field; allowed: {', '.join(STAGE_ORDER)}"
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    return msg[0].lower() + msg[1:]


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
        line = _node_line(node, ("schema_version",))
        raise RecipeError(
            f"{source}:{line}: field 'schema_version': this enginewright reads schema_version {SCHEMA_VERSION}, "
            f"got {version!r}"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        errors = exc.errors()
        # a list whose items failed also reports itself too short: keep the item errors only
        item_errors = {tuple(e["loc"][:n]) for e in errors for n in range(1, len(e["loc"]))}
        errors = [e for e in errors if not (e["type"] == "too_short" and tuple(e["loc"]) in item_errors)]
        for err in errors:
            loc = _field_path(tuple(err["loc"]))
            if err["type"] == "union_tag_invalid" and err["loc"][-1:] == ("engine",):
                loc = loc + ("backend",)
            field = ".".join(str(p) for p in loc) or "(top level)"
            line = _node_line(node, loc)
            where = f"{source}:{line}" if line else source
            lines.append(f"{where}: field '{field}': {_describe(err)}")
        raise RecipeError("\n".join(lines)) from None


def load_recipe(path: str | Path) -> LoadedRecipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found; pass the path of a YAML recipe such as recipes/tiny-llama.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None
    return LoadedRecipe(recipe=parse_recipe(text, str(path)), path=path.resolve())
