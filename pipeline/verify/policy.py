"""Verification policy: which threshold each stage is held to, and where each value came from.

Thresholds are plain data, never inferred from pydantic's bookkeeping: a recipe's `verify:`
sections are parsed into dicts that hold exactly the keys the user wrote (a dump of a recipe
holds the same keys, so a dump read back gives the same policy). A key the user did not write
is absent; `null` is a value and means "not checked" where a threshold allows it.

For an ONNX stage the layers are applied in this order, each replacing the ones before:

    1. the defaults below (DEFAULTS)
    2. the defaults of a stage up to and including this one that sets its own (a precision
       mode's; PRECISION_DEFAULTS)
    3. the recipe's top-level `verify:` section, as the user wrote it
    4. the `verify:` of each stage up to and including this one, in order

so a value the user set always beats a stage default, and a stage's own override holds for it
and every later stage. The quantize stage has gates of its own (its verify section over the
defaults for its bits), checked against the original model; no other stage's settings reach it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import ConfigDict, Field
from typing_extensions import TypedDict

Fraction = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[float, Field(gt=0)]


class Thresholds(TypedDict, total=False):
    """Thresholds of the ONNX stages; each key the user may set, null meaning 'not checked' where allowed."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    prefill_atol: Positive | None
    decode_atol: Positive | None
    min_greedy_match: Fraction
    max_kl_mean: Positive | None
    min_top1_agreement: Fraction | None
    min_cosine: Annotated[float, Field(ge=-1, le=1)]
    require_pair_ranking: bool


class QuantizeGates(TypedDict, total=False):
    """Gates of the quantize stage, against the original model on held-out text."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    max_kl_mean: Positive | None
    min_top1_agreement: Fraction | None
    # relative: 0.05 allows perplexity 5% above the original
    max_perplexity_increase: Positive | None


THRESHOLD_NAMES: tuple[str, ...] = tuple(Thresholds.__annotations__)

# What an ONNX stage is held to when nothing else says otherwise (FP32: near-exact).
DEFAULTS: dict[str, Any] = {
    "prefill_atol": 1e-4, "decode_atol": 1e-4, "min_greedy_match": 1.0, "max_kl_mean": None,
    "min_top1_agreement": None, "min_cosine": 0.999, "require_pair_ranking": True,
}

# From a precision stage on. Logit differences are not checked for INT8: KL and top-1 (decoders)
# or embedding cosine (encoders) are.
PRECISION_DEFAULTS: dict[str, dict[str, Any]] = {
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

# Gates a quantize stage starts from, by weight bits ("w8a8": weights and static per-tensor activations).
# W4 from measurements on the real SmolLM2-135M (8 x 128 held-out tokens): RTN W4 g64 asymmetric, a correct
# method and the weakest, gives KL 0.349, top-1 0.691, perplexity +37%; the same RTN with a broken layout (zero
# point off by one, scales shifted one group, symmetric zero on asymmetric integers) gives KL 8.6-15.4 and top-1
# 0.00-0.03. The tiny shipped model's RTN W4 g128 gives KL 0.108, top-1 0.863.
QUANTIZE_DEFAULTS: dict[int | str, dict[str, float]] = {
    4: {"max_kl_mean": 0.5, "min_top1_agreement": 0.6, "max_perplexity_increase": 0.5},
    8: {"max_kl_mean": 0.01, "min_top1_agreement": 0.97, "max_perplexity_increase": 0.05},
    "w8a8": {"max_kl_mean": 0.03, "min_top1_agreement": 0.93, "max_perplexity_increase": 0.15},
}


@dataclass(frozen=True)
class Threshold:
    value: Any
    source: str


@dataclass(frozen=True)
class Policy:
    """The effective thresholds of one stage. `policy.max_kl_mean` is a value (None: not checked)."""

    entries: Mapping[str, Threshold]

    def __getattr__(self, name: str) -> Any:
        entries = self.__dict__.get("entries", {})
        if name in entries:
            return entries[name].value
        raise AttributeError(f"no threshold named {name!r}")

    def values(self) -> dict[str, Any]:
        return {k: t.value for k, t in sorted(self.entries.items())}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {k: {"value": t.value, "source": t.source} for k, t in sorted(self.entries.items())}


def layered(layers: Iterable[tuple[str, Mapping[str, Any] | None]]) -> Policy:
    """Apply (source, values) layers in order; a later layer replaces an earlier one's keys."""
    entries: dict[str, Threshold] = {}
    for source, values in layers:
        for key, value in (values or {}).items():
            entries[key] = Threshold(value, source)
    return Policy(entries)


def onnx_stage_policy(top_level: Mapping[str, Any], chain: Iterable[Any]) -> Policy:
    """Thresholds for the last stage config in `chain` (the recipe's stages up to and including it).

    A stage config contributes through two optional methods: `threshold_defaults()` -> (label, dict)
    and `threshold_overrides()` -> dict of what its own verify section says."""
    chain = list(chain)
    layers: list[tuple[str, Mapping[str, Any] | None]] = [("default", DEFAULTS)]
    for cfg in chain:
        got = cfg.threshold_defaults() if hasattr(cfg, "threshold_defaults") else None
        if got:
            label, values = got
            layers.append((f"stages.{cfg.type} default ({label})", values))
    layers.append(("verify", top_level))
    for cfg in chain:
        own = cfg.threshold_overrides() if hasattr(cfg, "threshold_overrides") else None
        layers.append((f"stages.{cfg.type}.verify", own))
    return layered(layers)


def quantize_policy(label: str, defaults_key: int | str, overrides: Mapping[str, Any] | None) -> Policy:
    return layered([(f"default ({label})", QUANTIZE_DEFAULTS[defaults_key]),
                    ("stages.quantize.verify", overrides)])
