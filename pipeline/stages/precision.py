"""precision: FP16, dynamic INT8 or static INT8 Q/DQ, made once on the ONNX graph.

Precision lives in the graph itself (tensor types and explicit QuantizeLinear /
DequantizeLinear nodes), which is what ONNX Runtime reads and what TensorRT 11 requires.
Only weight MatMuls are quantized (B is a 2-D initializer); rotary/position MatMuls and
attention-score MatMuls never are, and the LM head only if the recipe asks.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from ..artifacts import CheckpointArtifact, onnx_input
from ..cache import Entry
from ..calibration import calibration_windows
from ..config import Strict
from ..errors import EnginewrightError, StageError
from ..onnx_files import MODEL, save_model
from ..qdq_calibration import EncoderCalibrationReader, KVCalibrationReader, ragged_histograms
from ..runtime.ort_lm import OrtLM, SessionSettings
from ..verify.policy import PRECISION_DEFAULTS, Thresholds
from ..verify.result import Verification
from .onnx_stage import OnnxStage


class CalibrationSpec(Strict):
    text: str = Field(default="pydoc:calib", description="pydoc:<split> or a UTF-8 text file (relative to the recipe).")
    samples: int = Field(default=16, ge=1, le=4096)
    seq_len: int = Field(default=64, ge=8, le=8192)
    seed: int = 0
    method: Literal["minmax", "percentile", "entropy"] = "minmax"


class Int8Fallback(Strict):
    """INT8 only: keep the weight MatMuls whose inputs carry the largest outliers in FP32, in growing steps,
    until the INT8 graph is within max_kl_mean of the FP32 graph on calibration windows (pipeline/int8_fallback.py)."""

    enabled: bool = True
    max_kl_mean: float = Field(default=0.01, gt=0, description="KL against the FP32 graph to reach, on calibration text.")
    max_layers: int = Field(default=16, ge=0, description="At most this many weight MatMuls stay in FP32.")
    text: str = Field(default="pydoc:calib", description="pydoc:<split> or a UTF-8 text file (relative to the recipe).")
    samples: int = Field(default=4, ge=1, le=256)
    seq_len: int = Field(default=128, ge=8, le=8192)
    seed: int = 1


class Int8Smoothing(Strict):
    """INT8: SmoothQuant's migration of activation outliers into the weights, done in the graph before
    quantizing (pipeline/int8_smoothing.py); the FP32 function is unchanged."""

    enabled: bool = True
    alpha: float | Literal["auto"] = Field(
        default="auto", description="Migration strength (0 none, 1 all to the weights), or auto: per input group, "
                                    "the alpha of 0.3-0.9 that gives its outputs the least INT8 error on calibration.")
    text: str = Field(default="pydoc:calib", description="pydoc:<split> or a UTF-8 text file (relative to the recipe).")
    samples: int = Field(default=8, ge=1, le=1024)
    seq_len: int = Field(default=128, ge=8, le=8192)
    seed: int = 1


class PrecisionConfig(Strict):
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
    activations: Literal["per-token", "per-tensor"] | None = Field(
        default=None, description="int8-dynamic: one activation scale per token (default; pipeline/int8_per_token.py) "
                                  "or one per tensor (ONNX Runtime's quantize_dynamic).")
    quantize_lm_head: bool = False
    keep_io_fp32: bool = True
    fp32_op_types: tuple[str, ...] = Field(
        default=("RMSNormalization", "SimplifiedLayerNormalization", "LayerNormalization", "Softmax", "Pow",
                 "ReduceMean", "Sqrt", "Reciprocal"),
        description="FP16: op types kept in FP32 (norms, softmax).")
    exclude: tuple[str, ...] = Field(
        default=(), description="INT8: weight MatMuls kept in FP32, named by the Hugging Face Linear whose weight "
                                "they carry (exact name or dotted suffix, as the quantize stage's exclude).")
    calibration: CalibrationSpec | None = None
    smoothing: Int8Smoothing | None = Field(default=None, description="INT8 modes (on by default for int8-dynamic): "
                                                                      "per-channel smoothing before quantizing.")
    fp32_fallback: Int8Fallback | None = Field(default=None, description="INT8 modes (on by default there): the "
                                                                         "outlier layers kept in FP32.")
    # thresholds for this stage and every later one, over the mode's defaults and the recipe's verify section
    verify: Thresholds | None = None

    @model_validator(mode="before")
    @classmethod
    def _fallback_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and str(data.get("mode", "")).startswith("int8") and data.get("fp32_fallback") is None:
            data = {**data, "fp32_fallback": {}}
        if isinstance(data, dict) and data.get("mode") == "int8-dynamic" and data.get("activations") is None:
            data = {**data, "activations": "per-token"}
        if isinstance(data, dict) and data.get("mode") == "int8-dynamic" and data.get("smoothing") is None:
            data = {**data, "smoothing": {}}
        return data

    @model_validator(mode="after")
    def _calibration(self) -> PrecisionConfig:
        if self.fp32_fallback is not None and not self.mode.startswith("int8"):
            raise ValueError(f"fp32_fallback chooses layers an INT8 graph keeps in FP32; mode {self.mode} has none: "
                             "remove it")
        if self.smoothing is not None and not self.mode.startswith("int8"):
            raise ValueError(f"smoothing prepares a graph for INT8; mode {self.mode} is not INT8: remove it")
        if self.exclude and not self.mode.startswith("int8"):
            raise ValueError(f"exclude keeps weight MatMuls out of INT8; mode {self.mode} is not INT8: remove it")
        if self.activations is not None and self.mode != "int8-dynamic":
            raise ValueError(f"activations chooses how int8-dynamic scales its activations; mode {self.mode} "
                             "does not: remove it")
        if self.mode == "int8-dynamic" and self.activations == "per-token" and not self.per_channel:
            raise ValueError("activations per-token quantizes weights per output channel; set per_channel: true "
                             "or activations: per-tensor")
        if self.mode == "int4" and self.calibration is not None:
            raise ValueError("mode int4 lowers the quantize stage's integers and does not calibrate; "
                             "remove the calibration section")
        if self.mode == "int8-qdq" and self.calibration is None:
            raise ValueError("mode int8-qdq needs a calibration section (text, samples, seq_len, seed, method)")
        if self.mode != "int8-qdq" and self.calibration is not None:
            raise ValueError(f"mode {self.mode} does not calibrate; remove the calibration section")
        return self

    def threshold_defaults(self) -> tuple[str, dict[str, Any]]:
        return f"mode {self.mode}", PRECISION_DEFAULTS[self.mode]

    def threshold_overrides(self) -> Thresholds | None:
        return self.verify


def weight_matmuls(model, logits_output: str | None, include_lm_head: bool) -> list[str]:
    """Names of MatMul/Gemm nodes that multiply an activation by a 2-D weight initializer."""
    inits = {i.name: i for i in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        a, b = node.input[0], node.input[1]
        weight = inits.get(b)
        if weight is None or a in inits or len(weight.dims) != 2 or min(weight.dims) < 2:
            continue
        if node.output[0] == logits_output and not include_lm_head:
            continue
        names.append(node.name)
    return names


def dedupe_nodes(model) -> None:
    """The FP16 converter can insert the same Cast twice (same input, output and name) when a
    tensor feeds two kept-in-FP32 ops; ONNX Runtime rejects the duplicate. Drop exact
    duplicates and give any other repeated node name a suffix."""
    produced: dict[str, bytes] = {}
    names: set[str] = set()
    keep = []
    for i, node in enumerate(model.graph.node):
        signature = node.SerializeToString()
        if node.output and node.output[0] in produced:
            if produced[node.output[0]] == signature:
                continue
            raise StageError(f"FP16 conversion produced two different nodes writing {node.output[0]}")
        for out in node.output:
            produced[out] = signature
        if node.name in names:
            node.name = f"{node.name}_{i}"
        names.add(node.name)
        keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


class PrecisionStage(OnnxStage):
    name = "precision"
    Config: ClassVar[type] = PrecisionConfig
    version = 11
    tools = ("onnx", "onnxruntime")
    memory_factor = 1.2

    def memory_multiple(self) -> float:
        """INT8 dynamic streams its rewrites tensor by tensor (1.21 measured, 0.73 B and 0.85 B); INT4 loads the
        graph to lower it (1.63 measured); FP16 and Q/DQ calibration load it through their libraries (not measured
        at size: 2x assumed)."""
        return {"int8-dynamic": 1.2, "int4": 1.7}.get(self.spec.mode, 2.0)

    @property
    def target_specific(self) -> bool:  # type: ignore[override]
        """An INT8 graph for the CPU is made for the integer kernels of the CPU it is built on."""
        return self.spec.mode.startswith("int8") and self.spec.target == "cpu"

    def target(self) -> dict[str, Any] | None:
        from ..target import int8_kernels

        return {"int8_kernels": int8_kernels()} if self.target_specific else None

    def key_material(self, parent_key: str | None) -> dict[str, Any]:
        material = super().key_material(parent_key)
        from ..calibration import text_identity

        for field in ("fp32_fallback", "smoothing"):
            section = getattr(self.spec, field)
            if section is not None and section.enabled:
                where = f"{self.ctx.recipe.path}: stages.precision.{field}"
                material[f"{field}_text"] = text_identity(section.text, self.ctx.recipe.path.parent, where=where)
        return material

    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        import onnx

        source = onnx_input(parent)
        src, io, external = source.model, source.io, source.external
        model = onnx.load(str(src), load_external_data=False)
        nodes = weight_matmuls(model, io.get("logits_output"), self.spec.quantize_lm_head)
        meta: dict[str, Any] = {"mode": self.spec.mode, "nodes_before": len(model.graph.node)}
        self.ctx.say(f"precision: {self.spec.mode}")
        with contextlib.redirect_stdout(sys.stderr):
            try:
                if self.spec.mode == "fp16":
                    self._fp16(src, out / MODEL, external)
                elif self.spec.mode == "int4":
                    meta["lowering"] = self._int4(src, out / MODEL, external)
                else:
                    nodes = self._int8(src, out, io, nodes, external, meta)
            except EnginewrightError:
                raise
            except Exception as exc:
                raise StageError(f"precision {self.spec.mode} failed on {src}: {type(exc).__name__}: {exc}") from exc
        result = onnx.load(str(out / MODEL), load_external_data=False)
        meta["quantized_nodes"] = (meta["lowering"]["lowered"] if self.spec.mode == "int4"
                                   else nodes if self.spec.mode != "fp16" else [])
        meta["nodes"] = len(result.graph.node)
        meta["op_types"] = sorted({n.op_type for n in result.graph.node})
        return self.finish(out, io, source, **meta)

    def _fp16(self, src: Path, dst: Path, external: bool) -> None:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(src))
        converted = convert_float_to_float16(model, keep_io_types=self.spec.keep_io_fp32,
                                             op_block_list=list(self.spec.fp32_op_types), disable_shape_infer=True)
        dedupe_nodes(converted)
        save_model(converted, dst, external)

    def _int4(self, src: Path, dst: Path, external: bool) -> dict[str, Any]:
        import onnx

        from ..lowering import load_qparams, lower_int4

        checkpoint = self.ctx.upstream("checkpoint")
        if not isinstance(checkpoint, CheckpointArtifact) or not checkpoint.qparams.is_file():
            raise StageError("precision int4 needs the integers of a weight-only quantize stage, which this run "
                             "does not have")
        info, params = load_qparams(checkpoint.folder)
        model = onnx.load(str(src))
        result = lower_int4(model, info, params, self.spec.int4_format, self.spec.accuracy_level)
        if result["not_found"]:
            raise StageError(f"INT4 lowering found no MatMul carrying the weights of {result['not_found'][:3]} "
                             f"({len(result['not_found'])} layers); the exported graph changed them")
        save_model(model, dst, external)
        return result

    def _int8(self, src: Path, out: Path, io: dict[str, Any], nodes: list[str], external: bool,
              meta: dict[str, Any]) -> list[str]:
        """Quantize to INT8 (dynamic or Q/DQ) with settings exact on this CPU's kernels, keeping the outlier layers
        the fallback chooses in FP32; returns the nodes quantized."""
        from ..target import int8_kernels

        kernels = int8_kernels() if self.spec.target == "cpu" else None
        saturates = bool(kernels and kernels["u8s8_saturates"])
        per_token = self.spec.mode == "int8-dynamic" and self.spec.activations == "per-token"
        # per token (our graph): unsigned weights take the u8 x u8 kernels, which widen to int16 before
        # multiplying and cannot saturate, keeping all 8 bits; ONNX Runtime's quantizers: 7-bit weights
        reduce_range = saturates and not per_token
        unsigned_weights = saturates and per_token
        if not saturates:
            why = "products accumulate in int32 here: signed 8-bit weights are exact"
        elif unsigned_weights:
            why = ("this CPU's u8 x s8 kernels add pairs of products in int16 and saturate: weights stored unsigned "
                   "(zero point 128) take the u8 x u8 kernels, exact at 8 bits")
        else:
            why = ("this CPU's u8 x s8 kernels add pairs of products in int16 and saturate: weights in 7 bits "
                   "cannot overflow")
        meta["int8_kernels"] = {**(kernels or {"kernels": "tensorrt"}), "reduce_range": reduce_range,
                                "weights": "uint8" if unsigned_weights else "int8", "why": why}
        dst = out / MODEL
        scratch = out / ".int8"
        if self.spec.exclude:
            nodes = self._exclude(src, nodes, meta)
        try:
            qsrc = self._smoothed(src, io, nodes, external, reduce_range, scratch, meta)
            return self._int8_fallback(src, qsrc, dst, io, nodes, external, reduce_range, scratch, meta)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _exclude(self, src: Path, nodes: list[str], meta: dict[str, Any]) -> list[str]:
        from ..int8_fallback import name_matmuls
        from ..quant.rtn import excluded

        names = name_matmuls(src, self.ctx.source_path, nodes)
        unused = [e for e in self.spec.exclude if not any(excluded(n, (e,)) for n in names.values())]
        if unused:
            raise StageError(f"{self.ctx.recipe.path}: stages.precision.exclude: {unused} name no Linear layer of "
                             f"this model's weight MatMuls (for example {sorted(names.values())[:3]}); fix or remove "
                             "them")
        kept = [n for n in nodes if excluded(names.get(n, ""), self.spec.exclude)]
        meta["excluded"] = sorted(names[n] for n in kept)
        return [n for n in nodes if n not in kept]

    def _smoothed(self, src: Path, io: dict[str, Any], nodes: list[str], external: bool, reduce_range: bool,
                  scratch: Path, meta: dict[str, Any]) -> Path:
        """The graph to quantize: `src`, or its smoothed FP32 twin when smoothing is on (decoders)."""
        from ..int8_smoothing import smooth_graph

        smoothing = self.spec.smoothing
        if smoothing is None or not smoothing.enabled or io.get("task", "causal-lm") != "causal-lm":
            meta["smoothing"] = {"enabled": False}
            return src
        windows = calibration_windows(self.ctx.tokenizer(), smoothing.text, smoothing.samples, smoothing.seq_len,
                                      smoothing.seed, self.ctx.recipe.path.parent,
                                      where=f"{self.ctx.recipe.path}: stages.precision.smoothing")
        self.ctx.say(f"smoothing activation outliers into the weights (alpha {smoothing.alpha})")
        dst = scratch / "smoothed" / MODEL
        dst.parent.mkdir(parents=True, exist_ok=True)
        per_token = self.spec.mode == "int8-dynamic" and self.spec.activations == "per-token"
        info = smooth_graph(src, dst, io, nodes, windows.windows,
                            None if smoothing.alpha == "auto" else float(smoothing.alpha), scratch / "capture",
                            external, per_token, 63 if reduce_range else 127)
        meta["smoothing"] = {"enabled": True, **info, "calibration": windows.identity()}
        return dst

    def _int8_fallback(self, src: Path, qsrc: Path, dst: Path, io: dict[str, Any], nodes: list[str],
                       external: bool, reduce_range: bool, scratch: Path, meta: dict[str, Any]) -> list[str]:
        """Quantize `qsrc` (the graph to quantize) to `dst`, keeping the layers the fallback chooses in FP32;
        the fallback measures against `src`, the FP32 graph."""
        from ..int8_fallback import choose_fp32, input_stats, name_matmuls
        from ..verify.accuracy import distribution_metrics, window_logprobs

        reader = None
        if self.spec.mode == "int8-qdq":
            reader, meta["calibration"] = self._qdq_reader(qsrc, io)
        else:
            meta["activations"] = self.spec.activations

        def quantize(selected: list[str]) -> Path:
            if reader is None:
                self._int8_dynamic(qsrc, dst, selected, external, reduce_range,
                                   meta["int8_kernels"]["weights"] == "uint8")
            else:
                reader.rewind()
                self._int8_qdq(qsrc, dst, reader, selected, external, reduce_range)
            return dst

        fallback = self.spec.fp32_fallback
        if fallback is None or not fallback.enabled or io.get("task", "causal-lm") != "causal-lm":
            meta["fp32_fallback"] = {"enabled": False}
            quantize(nodes)
            return nodes
        windows = calibration_windows(self.ctx.tokenizer(), fallback.text, fallback.samples, fallback.seq_len,
                                      fallback.seed, self.ctx.recipe.path.parent,
                                      where=f"{self.ctx.recipe.path}: stages.precision.fp32_fallback")
        per_token = self.spec.mode == "int8-dynamic" and self.spec.activations == "per-token"
        stats = input_stats(qsrc, io, nodes, windows.windows, scratch / "stats", per_token,
                            63 if reduce_range else 127)
        ranking = {n: s["output_error"] for n, s in stats.items()}
        settings = SessionSettings(graph_optimization_level="basic", intra_op_threads=0)
        reference = OrtLM(src, io, settings)
        ref = window_logprobs(reference, windows.windows)
        reference.close()

        def measure(path: Path) -> float:
            runner = OrtLM(path, io, settings)
            try:
                return distribution_metrics(ref, window_logprobs(runner, windows.windows))["kl_mean"]
            finally:
                runner.close()

        kept, trials, _ = choose_fp32(quantize, measure, nodes, ranking, fallback.max_kl_mean,
                                      fallback.max_layers, self.ctx.say)
        names = name_matmuls(src, self.ctx.source_path, kept)
        meta["fp32_fallback"] = {
            "enabled": True, "max_kl_mean": fallback.max_kl_mean, "calibration": windows.identity(),
            "ranked_by": "relative error INT8 puts on the MatMul's output (activations "
                         + ("per token" if per_token else "per tensor") + ") on calibration windows",
            "kept_fp32": [{"node": n, "layer": names.get(n), **stats[n], "rank": ranking[n]} for n in kept],
            "trials": trials, "met": trials[-1]["calibration_kl_mean"] <= fallback.max_kl_mean}
        return [n for n in nodes if n not in kept]

    def _int8_dynamic(self, src: Path, dst: Path, nodes: list[str], external: bool, reduce_range: bool,
                      unsigned_weights: bool) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        if self.spec.activations == "per-token":
            from ..int8_per_token import quantize_per_token

            quantize_per_token(src, dst, nodes, external, unsigned_weights=unsigned_weights)
            return

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=self.spec.per_channel,
                         reduce_range=reduce_range, op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                         use_external_data_format=external, extra_options={"MatMulConstBOnly": True})

    def _qdq_reader(self, src: Path, io: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        cal = self.spec.calibration
        windows = calibration_windows(self.ctx.tokenizer(), cal.text, cal.samples, cal.seq_len, cal.seed,
                                      self.ctx.recipe.path.parent,
                                      where=f"{self.ctx.recipe.path}: stages.precision.calibration")
        reader: EncoderCalibrationReader | KVCalibrationReader
        if io.get("task", "causal-lm") == "feature-extraction":
            reader = EncoderCalibrationReader(io, windows.windows, self.ctx.tokenizer())
        else:
            reader = KVCalibrationReader(src, io, windows.windows)
        signed = self.spec.target == "tensorrt"
        return reader, {**windows.identity(), "seed": cal.seed, "method": cal.method, "feeds": len(reader.feeds),
                        "activation_type": "int8 symmetric" if signed else "uint8"}

    def _int8_qdq(self, src: Path, dst: Path, reader: Any, nodes: list[str], external: bool,
                  reduce_range: bool) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        cal = self.spec.calibration
        signed = self.spec.target == "tensorrt"
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[cal.method]
        self.ctx.say(f"calibrating on {len(reader.feeds)} feeds ({cal.method})")
        with ragged_histograms():
            quantize_static(
                str(src), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                nodes_to_quantize=nodes, per_channel=self.spec.per_channel, reduce_range=reduce_range,
                activation_type=QuantType.QInt8 if signed else QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=method, use_external_data_format=external,
                extra_options={"ActivationSymmetric": signed, "WeightSymmetric": True, "MatMulConstBOnly": True},
            )

    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        v = self.verify_graph(out / MODEL, meta["io"], onnx_input(parent))
        v.metrics["quantized_matmuls"] = len(meta["quantized_nodes"])
        if meta.get("excluded"):
            v.notes.append(f"INT8: {len(meta['excluded'])} weight MatMuls kept in FP32 by the recipe's exclude "
                           f"{list(self.spec.exclude)}")
        fallback = meta.get("fp32_fallback") or {}
        if fallback.get("enabled"):
            kept = fallback["kept_fp32"]
            v.metrics["fp32_matmuls"] = len(kept)
            v.notes.append(f"INT8 fallback: {len(kept)} weight MatMuls kept in FP32 (ranked by {fallback['ranked_by']}: "
                           + (", ".join(f"{k['layer'] or k['node']} {k['rank']:.2g}" for k in kept)
                              or "none needed")
                           + f"); calibration KL {fallback['trials'][-1]['calibration_kl_mean']:.4g}, target "
                             f"{fallback['max_kl_mean']:g}" + ("" if fallback["met"] else " (NOT reached)"))
        smoothing = meta.get("smoothing") or {}
        if smoothing.get("enabled"):
            chosen = smoothing.get("alpha_chosen")
            alpha = (f"auto ({', '.join(f'{a}: {n}' for a, n in chosen.items())} groups)" if chosen
                     else f"{smoothing['alpha']}")
            v.notes.append(f"INT8 smoothing: alpha {alpha} over {smoothing['matmuls']} weight MatMuls "
                           f"in {smoothing['groups']} input groups, factors {smoothing['factor_min']:.3g} to "
                           f"{smoothing['factor_max']:.3g} (calibration: {smoothing['calibration']['samples']} x "
                           f"{smoothing['calibration']['seq_len']} tokens)")
        if meta.get("activations"):
            v.notes.append(f"INT8 activations: {meta['activations']} dynamic scales")
        kernels = meta.get("int8_kernels")
        if kernels:
            v.notes.append(f"INT8 kernels: {kernels['kernels']}; weights {kernels.get('weights', 'int8')}, reduce_range "
                           f"{kernels['reduce_range']}: {kernels['why']}")
        v.metrics["nodes_after"] = meta["nodes"]
        return v

