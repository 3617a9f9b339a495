"""Cache garbage collection: keep what recent runs use, respect a size budget, and never
touch an entry that a running pipeline holds (its build lock)."""

from __future__ import annotations

import json

from .cache import ArtifactCache, entry_size


def recent_keys(store: ArtifactCache, keep_runs: int) -> set[str]:
    runs_dir = store.root / "runs"
    if not runs_dir.is_dir() or keep_runs <= 0:
        return set()
    reports = sorted(runs_dir.glob("*/report.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    keys: set[str] = set()
    for report in reports[:keep_runs]:
        try:
            data = json.loads(report.read_text())
            keys.update(s["key"] for s in data["stages"])
            keys.update(data.get("imports", []))  # a GGUF's converted folder, which the run's model was
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return keys


def collect(store: ArtifactCache, keep_runs: int = 5, max_bytes: float | None = None,
            dry_run: bool = False) -> tuple[list[tuple[str, int]], int]:
    """Delete unprotected entries, oldest first; all of them, or until the cache fits max_bytes.

    Returns the (key, size) pairs deleted and the number of entries kept.
    """
    protected = recent_keys(store, keep_runs)
    entries = store.entries()
    sizes = {e.key: entry_size(e.path) for e in entries}
    total = sum(sizes.values())
    candidates = sorted((e for e in entries if e.key not in protected),
                        key=lambda e: e.meta.get("created", 0.0))
    removed = []
    for e in candidates:
        if max_bytes is not None and total <= max_bytes:
            break
        if store.is_locked(e.key):
            continue
        if not dry_run:
            store.remove(e.key)
        removed.append((e.key, sizes[e.key]))
        total -= sizes[e.key]
    return removed, len(entries) - len(removed)
