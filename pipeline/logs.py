"""Quieting a library's logger for the length of one call, and putting it back."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TextIO


@contextlib.contextmanager
def quieted(logger: logging.Logger, level: int) -> Iterator[None]:
    """Within the block `logger` lets through only records at `level` or above."""
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[TextIO]:
    """Within the block everything written to standard output goes to standard error instead: Python's
    sys.stdout, handlers that captured it at import time, and C code writing to file descriptor 1 (what
    libraries such as GPT-QModel print). Yields a stream onto the real standard output, for the one
    document a command means to print there."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        on_fd1 = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # not a real file (a test runner's capture)
        on_fd1 = False
    saved = os.dup(1)
    document: TextIO = os.fdopen(os.dup(saved), "w", encoding="utf-8") if on_fd1 else sys.stdout
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield document
    finally:
        sys.stderr.flush()
        document.flush()
        os.dup2(saved, 1)
        os.close(saved)
        if on_fd1:
            document.close()
