"""Content hashes and canonical JSON used for cache keys and manifests."""

from __future__ import annotations

import hashlib
import json
import os
import time
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


def file_table(root: Path, memo: HashMemo | None = None) -> dict[str, dict[str, Any]]:
    """Relative path -> {sha256, size} for every regular file below root (sorted). With a memo, a file
    whose size, mtime and inode are unchanged is not read again."""
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        digest = memo.sha256(path) if memo is not None else sha256_file(path)
        table[rel] = {"sha256": digest, "size": path.stat().st_size}
    return table


class HashMemo:
    """sha256 of files, remembered by (path, size, mtime in ns, inode), so a plan or an all-hits run costs
    a stat per file instead of a read of every byte. A file rewritten in place gets a new mtime and is
    hashed again; the memo is a JSON file replaced atomically (a lost update only costs a re-read).
    A file modified within the last RACY_SECONDS is hashed but not remembered: a second write in the same
    clock tick as the first would keep its size and mtime (git's "racy" entries)."""

    RACY_SECONDS = 2.0

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data: dict[str, str] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    def sha256(self, file: Path) -> str:
        st = file.stat()
        memo_key = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        if memo_key in self.data:
            return self.data[memo_key]
        digest = sha256_file(file)
        if time.time() - st.st_mtime > self.RACY_SECONDS:
            self.data[memo_key] = digest
            self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        self.data = {k: v for k, v in self.data.items() if _current(k)}  # forget files changed or gone
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.part")
        tmp.write_text(json.dumps(self.data, indent=0, sort_keys=True))
        os.replace(tmp, self.path)
        self.dirty = False



def _current(memo_key: str) -> bool:
    path, size, mtime, ino = memo_key.rsplit("|", 3)
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (str(st.st_size), str(st.st_mtime_ns), str(st.st_ino)) == (size, mtime, ino)
