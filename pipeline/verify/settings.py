"""The recipe's top-level `verify:` section: what every stage is checked on, and the thresholds the
user set for all ONNX stages (flat in the YAML, kept as exactly the keys written)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SerializationInfo, SerializerFunctionWrapHandler, model_serializer, model_validator

from ..config import Strict
from .policy import THRESHOLD_NAMES, Thresholds


class LatencySpec(Strict):
    warmup: int = Field(default=2, ge=0)
    repeats: int = Field(default=5, ge=1)
    prompt_tokens: int = Field(default=32, ge=1)
    decode_tokens: int = Field(default=32, ge=2)


class VerifySpec(Strict):
    # the thresholds written in the section (prefill_atol, max_kl_mean, ...; see pipeline/verify/policy.py);
    # in the YAML they sit beside the settings below, and a dump puts them back there
    thresholds: Thresholds = Field(default_factory=lambda: Thresholds())
    greedy_tokens: int = Field(default=16, ge=1)
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

    @model_validator(mode="before")
    @classmethod
    def _collect_thresholds(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "thresholds" in data:
            raise ValueError("unknown field 'thresholds': write thresholds directly in verify "
                             f"({', '.join(THRESHOLD_NAMES)})")
        data = dict(data)
        data["thresholds"] = {k: data.pop(k) for k in THRESHOLD_NAMES if k in data}
        return data

    @model_serializer(mode="wrap")
    def _flatten_thresholds(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        out = handler(self)
        if isinstance(out, dict):
            out.update(out.pop("thresholds", None) or {})
        return out

    def settings(self) -> dict[str, Any]:
        """Everything but the thresholds: what the reference outputs and the latency runs are made of."""
        out = self.model_dump(mode="json")
        for name in THRESHOLD_NAMES:
            out.pop(name, None)
        return out
