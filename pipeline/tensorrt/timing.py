"""TensorRT timing caches, one per GPU fingerprint, TensorRT version and compatibility level.

A timing cache grows with every build, so it is not an immutable content-addressed entry: it
lives beside them as `<cache root>/timing-caches/<key>.cache`, where the key hashes what the
timings are specific to. A build holds the key's lock from loading the file to writing it
back (atomically), so two builds on one GPU never interleave their updates.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..cache import ArtifactCache
from ..hashing import chain_key

FOLDER = "timing-caches"


def timing_cache_key(gpu_key: dict[str, Any], hardware_compatibility_level: str) -> str:
    return chain_key({"kind": "tensorrt-timing-cache", "gpu": gpu_key,
                      "hardware_compatibility_level": hardware_compatibility_level})


class TimingCacheStore:
    def __init__(self, cache: ArtifactCache):
        self.cache = cache

    def path(self, key: str) -> Path:
        self.cache.entry_dir(key)  # validates the key's form
        return self.cache.root / FOLDER / f"{key}.cache"

    @contextmanager
    def open(self, key: str) -> Iterator[Path]:
        """A private working copy of the cache (absent if there is none yet), written back on success."""
        final = self.path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with self.cache.lock(key):
            work = final.parent / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.work"
            if final.is_file():
                shutil.copy2(final, work)
            try:
                yield work
                if work.is_file() and work.stat().st_size > 0:
                    os.replace(work, final)
            finally:
                for leftover in (work, Path(str(work) + ".lock")):
                    leftover.unlink(missing_ok=True)
