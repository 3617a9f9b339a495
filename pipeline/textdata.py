"""Offline text for training, calibration and evaluation.

Built-in sets come from the Python documentation topics that ship with every CPython
(``pydoc_data.topics``), split deterministically by topic name so the training,
calibration and evaluation texts never overlap. A recipe may instead name a UTF-8 text
file. Every text is identified by the sha256 of its content, which goes into cache keys.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

BUILTIN_SPLITS = ("train", "calib", "eval")
BUILTIN_PREFIX = "pydoc:"


def _split_of(topic: str) -> str:
    bucket = hashlib.sha256(topic.encode("utf-8")).digest()[0] % 10
    if bucket in (0, 9):
        return "eval"
    if bucket == 1:
        return "calib"
    return "train"


def builtin_text(split: str) -> str:
    """Concatenated pydoc topics of one split ('train', 'calib' or 'eval')."""
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"unknown built-in text split {split!r}; known: {', '.join(BUILTIN_SPLITS)}")
    from pydoc_data.topics import topics

    parts = [topics[name] for name in sorted(topics) if _split_of(name) == split]
    return "\n\n".join(parts)


@dataclass(frozen=True)
class Text:
    name: str
    content: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode("utf-8")).hexdigest()


def load_text(source: str, base_dir: Path | None = None) -> Text:
    """Load ``pydoc:<split>`` or a text file path (relative paths resolve against base_dir)."""
    if source.startswith(BUILTIN_PREFIX):
        return Text(source, builtin_text(source[len(BUILTIN_PREFIX):]))
    path = Path(source)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise FileNotFoundError(
            f"text file {path} does not exist; name a UTF-8 text file or one of "
            + ", ".join(BUILTIN_PREFIX + s for s in BUILTIN_SPLITS)
        )
    return Text(str(path), path.read_text(encoding="utf-8"))
