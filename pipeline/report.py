"""Run reports: report.json (schema in the README) and a readable report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# metrics shown in the Markdown tables, in this order, with their formats
ACCURACY_COLUMNS = [
    ("prefill_max_abs_diff", "prefill max abs diff", "{:.2e}"),
    ("decode_max_abs_diff", "decode max abs diff", "{:.2e}"),
    ("vs_previous_stage_max_abs_diff", "vs previous stage", "{:.2e}"),
    ("greedy", "greedy tokens", "{}"),
]
LATENCY_COLUMNS = [
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("baseline_decode_tokens_per_s", "PyTorch tok/s", "{:.1f}"),
    ("decode_speedup_vs_baseline", "speed-up", "{:.2f}x"),
    ("decode_step_ms_p50", "step p50 ms", "{:.3f}"),
    ("decode_step_ms_p90", "step p90 ms", "{:.3f}"),
    ("decode_step_ms_p99", "step p99 ms", "{:.3f}"),
    ("prefill_ms", "prefill ms", "{:.2f}"),
]


def _cell(metrics: dict[str, Any], key: str, fmt: str) -> str:
    if key == "greedy":
        if "greedy_tokens_total" not in metrics:
            return "–"
        return f"{metrics['greedy_tokens_matched']}/{metrics['greedy_tokens_total']}"
    value = metrics.get(key)
    return "–" if value is None else fmt.format(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# enginewright run: {report['recipe']['name']}", ""]
    lines.append(f"Status: **{report['status']}** in {report['seconds']:.1f} s; recipe `{report['recipe']['path']}`; "
                 f"target {report['host']['cpu']['model']} ({', '.join(report['host']['cpu']['isa']) or 'no SIMD flags'}).")
    if report.get("error"):
        lines += ["", "Error: " + report["error"].replace("\n", " ")]
    lines += ["", "## Stages", ""]
    rows = []
    for s in report["stages"]:
        verdict = "passed" if s["verify"]["passed"] else "FAILED"
        rows.append([s["name"], "hit" if s["cached"] else "built", f"{s['seconds']:.2f}", verdict,
                     f"`{s['key'][:12]}…`", f"`{s['artifact']}`"])
    lines += _table(["stage", "cache", "seconds", "verify", "key", "artifact"], rows)
    onnx_stages = [s for s in report["stages"] if "prefill_max_abs_diff" in s["verify"]["metrics"]]
    if onnx_stages:
        lines += ["", "## Accuracy against PyTorch", ""]
        lines += _table(["stage"] + [c[1] for c in ACCURACY_COLUMNS],
                        [[s["name"]] + [_cell(s["verify"]["metrics"], k, f) for k, _, f in ACCURACY_COLUMNS]
                         for s in onnx_stages])
        lines += ["", "## Latency (batch 1, greedy, KV cache)", ""]
        lines += _table(["stage", "threads"] + [c[1] for c in LATENCY_COLUMNS],
                        [[s["name"], str(s["verify"]["metrics"].get("threads", "–"))]
                         + [_cell(s["verify"]["metrics"], k, f) for k, _, f in LATENCY_COLUMNS] for s in onnx_stages])
    failures = [(s["name"], f) for s in report["stages"] for f in s["verify"]["failures"]]
    notes = [(s["name"], n) for s in report["stages"] for n in s["verify"].get("notes", [])]
    if failures:
        lines += ["", "## Verification failures", ""] + [f"- {n}: {f}" for n, f in failures]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}: {t}" for n, t in notes]
    if report["cache"]["events"]:
        lines += ["", "## Cache events", ""] + [f"- {e['kind']} `{e['key'][:12]}…`: {e['detail']}"
                                                for e in report["cache"]["events"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    (folder / "report.md").write_text(render_markdown(report))
