"""Feeds for ONNX Runtime's static (Q/DQ) calibration: one per window for encoders, a prefill and a
continuation with the real past for decoders, and a fix for its histogram collectors on ragged shapes."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from .runtime.base import position_ids_from_mask
from .runtime.ort_lm import OrtLM, SessionSettings


@contextlib.contextmanager
def ragged_histograms():
    """ONNX Runtime's histogram collector (Percentile, Entropy) stacks each tensor's calibration
    outputs with np.asarray, which fails when feeds have different shapes (prefill and decode
    feeds always do). Histograms need only the values, so hand it one flat array per tensor.
    Restored on exit."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    original = HistogramCollector.collect

    def collect(self, name_to_arr):
        flat = {name: np.concatenate([np.asarray(a).ravel() for a in arrs]) if isinstance(arrs, list) else arrs
                for name, arrs in name_to_arr.items()}
        return original(self, flat)

    HistogramCollector.collect = collect
    try:
        yield
    finally:
        HistogramCollector.collect = original


class EncoderCalibrationReader:
    """One feed per calibration window, framed as the tokenizer frames a sentence ([CLS] ... [SEP]):
    the first token's activations are outliers in BERT-style encoders, and calibrating without it
    clips them at inference."""

    def __init__(self, io: dict[str, Any], windows: np.ndarray, tokenizer: Any):
        empty = list(tokenizer("")["input_ids"])  # e.g. [CLS, SEP] for BERT
        cls_id, sep_id = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
        prefix = empty[:1] if empty and cls_id is not None and empty[0] == cls_id else []
        suffix = empty[-1:] if empty and sep_id is not None and empty[-1] == sep_id else []
        self.feeds = []
        for row in windows:
            body = list(row[: max(1, len(row) - len(prefix) - len(suffix))])
            ids = np.array([prefix + body + suffix], dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            if "token_type_ids" in io["inputs"]:
                feed["token_type_ids"] = np.zeros_like(ids)
            self.feeds.append(feed)
        self._iter = iter(self.feeds)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.feeds)


class KVCalibrationReader:
    """Feeds each calibration window twice: a prefill of its first half with an empty past, and its
    second half as a continuation with the real past from the FP32 model (so KV-cache inputs and
    decode-shaped activations are calibrated too)."""

    def __init__(self, fp32_model: Path, io: dict[str, Any], windows: np.ndarray):
        runner = OrtLM(fp32_model, io, SessionSettings(graph_optimization_level="basic", intra_op_threads=0))
        self.feeds: list[dict[str, np.ndarray]] = []
        for row in windows:
            ids = row[None, :]
            half = ids.shape[1] // 2
            first, second = ids[:, :half], ids[:, half:]
            mask = np.ones_like(first)
            past = runner.empty_past(1)
            self.feeds.append(self._feed(io, first, mask, position_ids_from_mask(mask), past))
            _, presents = runner.forward(first, mask, position_ids_from_mask(mask), past)
            full_mask = np.ones_like(ids)
            presents = [p.numpy() for p in presents]
            self.feeds.append(self._feed(io, second, full_mask, position_ids_from_mask(full_mask, half), presents))
        runner.close()
        self._iter = iter(self.feeds)

    @staticmethod
    def _feed(io, ids, mask, pos, past) -> dict[str, np.ndarray]:
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        feed.update(dict(zip(io["past_inputs"], past)))
        return feed

    def get_next(self):
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self.feeds)
