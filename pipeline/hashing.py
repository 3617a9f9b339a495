"""Content hashes and canonical JSON used for cache keys and manifests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configs give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def chain_key(*parts: Any) -> str:
    """sha256 over the canonical JSON of every part, in order."""
    return sha256_bytes(canonical_json(list(parts)).encode("ascii"))


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """Relative path -> {sha256, size} for every regular file below root (sorted)."""
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table
