"""Quieting a library's logger for the length of one call, and putting it back."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quieted(logger: logging.Logger, level: int) -> Iterator[None]:
    """Within the block `logger` lets through only records at `level` or above."""
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)
