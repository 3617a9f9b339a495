"""Why a stage's key misses the cache: compare it with entries the same stage left for the same
parent (same upstream artifact), and name what differs (another GPU, another TensorRT version,
another setting). Reads entry metadata only."""

from __future__ import annotations

from typing import Any

from .cache import ArtifactCache

MAX_SHOWN = 4


def differences(mine: Any, theirs: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, their value, my value) for every leaf that differs."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        out = []
        for k in sorted(set(mine) | set(theirs), key=str):
            out += differences(mine.get(k), theirs.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if mine == theirs else [(path, theirs, mine)]


def explain_miss(cache: ArtifactCache, material: dict[str, Any]) -> str | None:
    """A sentence naming what differs from the closest cached entry of this stage, or None."""
    stage, parent = material.get("stage"), material.get("parent")
    if parent is None:
        return None  # the first stage: another model's entry is another model, not another setting
    best: list[tuple[str, Any, Any]] | None = None
    for entry in cache.entries():
        theirs = entry.meta.get("key_material")
        if entry.meta.get("stage") != stage or not isinstance(theirs, dict) or theirs.get("parent") != parent:
            continue
        diff = differences(material, theirs)
        if diff and (best is None or len(diff) < len(best)):
            best = diff
    if not best:
        return None
    target = [d for d in best if d[0].startswith("target.")]
    shown = (target or best)[:MAX_SHOWN]
    parts = [f"{p.removeprefix('target.')} {_fmt(theirs)} there, {_fmt(mine)} here" for p, theirs, mine in shown]
    more = len(best) - len(shown)
    what = "another target" if target else "other settings"
    return (f"an entry exists for {what}: " + "; ".join(parts) + (f"; and {more} more difference(s)" if more else ""))


def _fmt(value: Any) -> str:
    return "absent" if value is None else repr(value)
