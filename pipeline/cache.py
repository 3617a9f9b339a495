"""Content-addressed artifact store.

Layout under the cache root::

    <key[:2]>/<key>/            one finished entry: its files, entry.json, manifest.json
    .tmp/<key>.<pid>.<nonce>/   an entry being built (renamed into place when done)
    .locks/<key>.lock           held while an entry is built
    .corrupt/<key>.<time>/      entries that failed their manifest check, moved aside
    runs/<time>-<recipe>/       run reports

An entry is served only if its manifest exists (it is written last) and every file in it
still has the size and sha256 the manifest records.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CacheError
from .hashing import HashMemo, file_table

MANIFEST = "manifest.json"
ENTRY = "entry.json"


@dataclass
class Entry:
    key: str
    path: Path
    meta: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name


@dataclass
class CacheEvent:
    key: str
    kind: str  # "corrupt", "swept"
    detail: str


@dataclass
class ArtifactCache:
    root: Path
    events: list[CacheEvent] = field(default_factory=list)

    _memo: HashMemo | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()

    @property
    def memo(self) -> HashMemo:
        """Digests of files already hashed (model folders and entries), keyed by path, size, mtime and inode."""
        if self._memo is None:
            self._memo = HashMemo(self.root / ".hashmemo.json")
        return self._memo

    # ---- paths -------------------------------------------------------------------------
    def entry_dir(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise CacheError(f"not a cache key: {key!r}")
        return self.root / key[:2] / key

    def _sub(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---- reading -----------------------------------------------------------------------
    def check(self, key: str) -> tuple[str, str]:
        """('hit'|'miss'|'corrupt', detail) without changing anything."""
        path = self.entry_dir(key)
        if not path.is_dir():
            return "miss", "no entry"
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return "corrupt", "manifest.json is missing"
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
        except (ValueError, KeyError, TypeError) as exc:
            return "corrupt", f"manifest.json is unreadable ({exc})"
        actual = file_table(path, self.memo)
        self.memo.save()
        actual.pop(MANIFEST, None)
        if set(actual) != set(files):
            missing = sorted(set(files) - set(actual))
            extra = sorted(set(actual) - set(files))
            return "corrupt", f"files differ from the manifest (missing {missing}, unexpected {extra})"
        for name, want in files.items():
            got = actual[name]
            if got["size"] != want["size"]:
                return "corrupt", f"{name} has {got['size']} bytes, the manifest says {want['size']}"
            if got["sha256"] != want["sha256"]:
                return "corrupt", f"{name} does not match its sha256 in the manifest"
        return "hit", "manifest verified"

    def lookup(self, key: str) -> Entry | None:
        """A verified entry, or None. A corrupt entry is moved aside and reported as an event."""
        state, detail = self.check(key)
        if state == "miss":
            return None
        if state == "corrupt":
            self.quarantine(key, detail)
            return None
        path = self.entry_dir(key)
        return Entry(key=key, path=path, meta=json.loads((path / ENTRY).read_text()))

    def quarantine(self, key: str, detail: str) -> None:
        src = self.entry_dir(key)
        dest = self._sub(".corrupt") / f"{key}.{time.strftime('%Y%m%dT%H%M%S')}.{uuid.uuid4().hex[:6]}"
        try:
            os.rename(src, dest)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise CacheError(f"cache entry {src} is corrupt ({detail}) and could not be moved aside: {exc}") from exc
        self.events.append(CacheEvent(key, "corrupt", f"{detail}; moved to {dest}"))

    # ---- writing -----------------------------------------------------------------------
    @contextmanager
    def lock(self, key: str, timeout: float = -1) -> Iterator[None]:
        from filelock import FileLock

        with FileLock(str(self._sub(".locks") / f"{key}.lock"), timeout=timeout):
            yield

    def is_locked(self, key: str) -> bool:
        from filelock import FileLock, Timeout

        lock = FileLock(str(self._sub(".locks") / f"{key}.lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return True
        lock.release()
        return False

    @contextmanager
    def building(self, key: str) -> Iterator[Path]:
        """A fresh temporary folder for an entry; removed if the body raises."""
        tmp = self._sub(".tmp") / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def commit(self, key: str, tmp: Path, meta: dict[str, Any]) -> Entry:
        """Write entry.json and the manifest (last), then rename the folder into place."""
        (tmp / ENTRY).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        files = file_table(tmp)
        manifest = {"key": key, "files": files, "created": time.time()}
        part = tmp / (MANIFEST + ".part")
        part.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _fsync_tree(tmp)
        os.replace(part, tmp / MANIFEST)
        final = self.entry_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a forced rebuild replaces the old entry
            old = self._sub(".tmp") / f"{key}.old.{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
        return Entry(key=key, path=final, meta=meta)

    def sweep_tmp(self) -> None:
        """Remove temporary folders left by processes that no longer run (a killed build)."""
        tmp_root = self.root / ".tmp"
        if not tmp_root.is_dir():
            return
        for path in tmp_root.iterdir():
            parts = path.name.split(".")
            pid = int(parts[1]) if len(parts) >= 3 and parts[1].isdigit() else None
            if pid is not None and _alive(pid):
                continue
            shutil.rmtree(path, ignore_errors=True)
            self.events.append(CacheEvent(parts[0], "swept", f"removed unfinished build {path.name}"))

    # ---- listing -----------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        out: list[Entry] = []
        if not self.root.is_dir():
            return out
        for fan in sorted(self.root.iterdir()):
            if len(fan.name) != 2 or not fan.is_dir():
                continue
            for path in sorted(fan.iterdir()):
                try:
                    meta = json.loads((path / ENTRY).read_text())
                except (OSError, ValueError):
                    meta = {}
                out.append(Entry(key=path.name, path=path, meta=meta))
        return out

    def remove(self, key: str) -> None:
        path = self.entry_dir(key)
        doomed = self._sub(".tmp") / f"{key}.gc.{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)  # atomic: no reader sees a half-deleted entry
        shutil.rmtree(doomed, ignore_errors=True)


def entry_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
