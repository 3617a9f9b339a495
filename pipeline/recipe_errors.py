"""YAML positions and pydantic errors turned into one line per problem: file, line, field, fix."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from .registry import ENGINE_BACKENDS, STAGE_ORDER

# containers the schema adds that the YAML does not show (the top-level thresholds are flat in `verify:`)
HIDDEN_FIELDS = {("verify", "thresholds")}


def field_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop the discriminator tags pydantic inserts after a list index (stages.0.export.opset) and the
    containers the YAML does not have."""
    out: list[Any] = []
    previous: Any = None
    for part in loc:
        tag, previous = previous, part
        if out and isinstance(out[-1], int) and isinstance(part, str) and part in STAGE_ORDER:
            continue
        if tag == "engine" and part in ENGINE_BACKENDS:  # the engine's backend tag
            continue
        if (tag, part) in HIDDEN_FIELDS:
            continue
        out.append(part)
    return tuple(out)


def node_line(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at a field path, or of its nearest existing parent."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            nxt = node.value[part]
        if nxt is None:
            break
        node = nxt
        line = node.start_mark.line + 1
    return line


def describe(err: Any) -> str:
    kind = err["type"]
    msg = err["msg"]
    if kind == "extra_forbidden":
        return "unknown field; remove it or check its spelling"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        return msg.replace("Input should be", "must be")
    if kind == "union_tag_invalid" and err.get("ctx", {}).get("discriminator") == "_engine_backend()":
        return f"unknown engine backend {err['ctx'].get('tag')!r}; allowed: {', '.join(ENGINE_BACKENDS)}"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"unknown stage type {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return f"a stage needs a 'type' field; allowed: {', '.join(STAGE_ORDER)}"
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    return msg[0].lower() + msg[1:]


def validation_messages(exc: ValidationError, node: yaml.Node | None, source: str) -> list[str]:
    """One message per error, each naming the file, the line, the field and what is allowed."""
    lines = []
    errors = exc.errors()
    # a list whose items failed also reports itself too short: keep the item errors only
    item_errors = {tuple(e["loc"][:n]) for e in errors for n in range(1, len(e["loc"]))}
    errors = [e for e in errors if not (e["type"] == "too_short" and tuple(e["loc"]) in item_errors)]
    for err in errors:
        loc = field_path(tuple(err["loc"]))
        if err["type"] == "union_tag_invalid" and err["loc"][-1:] == ("engine",):
            loc = loc + ("backend",)
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = node_line(node, loc)
        where = f"{source}:{line}" if line else source
        lines.append(f"{where}: field '{field}': {describe(err)}")
    return lines
