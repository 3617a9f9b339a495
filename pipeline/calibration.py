"""Calibration samples: token windows cut from an offline text, reproducibly.

The sample set is identified by the text's sha256 plus (samples, seq_len, seed), and that
identity is part of the cache key of every stage that calibrates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RecipeError
from .textdata import load_text


@dataclass(frozen=True)
class CalibrationSet:
    text_name: str
    text_sha256: str
    windows: np.ndarray  # [samples, seq_len] int64

    def identity(self) -> dict[str, Any]:
        n, length = self.windows.shape
        return {"text": self.text_name, "sha256": self.text_sha256, "samples": n, "seq_len": length}


def text_identity(source: str, base_dir: Path | None, where: str = "calibration") -> dict[str, str]:
    """What goes into a cache key for a calibration text (content, not path)."""
    try:
        text = load_text(source, base_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise RecipeError(f"{where}.text: {exc}") from None
    return {"source": source, "sha256": text.sha256}


def calibration_windows(tokenizer: Any, source: str, samples: int, seq_len: int, seed: int,
                        base_dir: Path | None = None, where: str = "calibration") -> CalibrationSet:
    """`samples` windows of `seq_len` tokens at seeded random offsets; non-overlapping when possible."""
    try:
        text = load_text(source, base_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise RecipeError(f"{where}.text: {exc}") from None
    # paragraph by paragraph: no special tokens inside the stream, no over-length warnings
    paragraphs = [p for p in text.content.split("\n\n") if p.strip()]
    encoded = tokenizer(paragraphs, add_special_tokens=False)["input_ids"] if paragraphs else []
    ids = np.asarray([t for para in encoded for t in para], dtype=np.int64)
    available = len(ids) // seq_len
    if available < samples:
        raise RecipeError(
            f"{where}: text {source} has {len(ids)} tokens, enough for {available} windows of {seq_len}; "
            f"asked for {samples}. Lower {where}.samples or {where}.seq_len, or give a longer text"
        )
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(available, size=samples, replace=False)) * seq_len
    windows = np.stack([ids[s : s + seq_len] for s in starts])
    return CalibrationSet(source, text.sha256, windows)
