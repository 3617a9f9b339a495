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
    ("kl_mean", "KL (held-out)", "{:.2e}"),
    ("top1_agreement", "top-1", "{:.2%}"),
]
ENCODER_ACCURACY_COLUMNS = [
    ("hidden_max_abs_diff", "hidden max abs diff", "{:.2e}"),
    ("embedding_cosine_min", "cosine min", "{:.5f}"),
    ("embedding_cosine_mean", "cosine mean", "{:.5f}"),
    ("pair_ranking_preserved", "pair ranking kept", "{}"),
    ("vs_previous_stage_max_abs_diff", "vs previous stage", "{:.2e}"),
]
ENCODER_LATENCY_COLUMNS = [
    ("sentences_per_s", "sentences/s", "{:.1f}"),
    ("baseline_sentences_per_s", "PyTorch sentences/s", "{:.1f}"),
    ("speedup_vs_baseline", "speed-up", "{:.2f}x"),
    ("batch_ms_p50", "batch p50 ms", "{:.2f}"),
    ("batch_ms_p90", "batch p90 ms", "{:.2f}"),
    ("batch_ms_p99", "batch p99 ms", "{:.2f}"),
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
    quantized = [s for s in report["stages"] if "perplexity_ref" in s["verify"]["metrics"]]
    if quantized:
        lines += ["", "## Quantization against the original model (checkpoint reloaded from disk)", ""]
        lines += _table(["stage", "perplexity", "original", "change", "KL", "top-1", "seconds", "peak RSS MB"],
                        [[s["name"], f"{m['perplexity']:.4f}", f"{m['perplexity_ref']:.4f}",
                          f"{m['perplexity_change']:+.2%}", f"{m['kl_mean']:.3e}", f"{m['top1_agreement']:.2%}",
                          f"{m['quantize_seconds']:.2f}", f"{m['peak_rss_mb']:.0f}"]
                         for s in quantized for m in [s["verify"]["metrics"]]])
        lines += ["", "ONNX stages after a quantize stage are verified against the quantized PyTorch model."]
    onnx_stages = [s for s in report["stages"] if "prefill_max_abs_diff" in s["verify"]["metrics"]]
    encoder_stages = [s for s in report["stages"] if "embedding_cosine_min" in s["verify"]["metrics"]]
    if encoder_stages:
        lines += ["", "## Embeddings against PyTorch", ""]
        lines += _table(["stage"] + [c[1] for c in ENCODER_ACCURACY_COLUMNS],
                        [[s["name"]] + [_cell(s["verify"]["metrics"], k, f) for k, _, f in ENCODER_ACCURACY_COLUMNS]
                         for s in encoder_stages])
        lines += ["", "## Latency (one padded batch of the verification sentences)", ""]
        lines += _table(["stage", "threads"] + [c[1] for c in ENCODER_LATENCY_COLUMNS],
                        [[s["name"], str(s["verify"]["metrics"].get("threads", "–"))]
                         + [_cell(s["verify"]["metrics"], k, f) for k, _, f in ENCODER_LATENCY_COLUMNS]
                         for s in encoder_stages])
    if onnx_stages:
        lines += ["", "## Accuracy against PyTorch", ""]
        lines += _table(["stage"] + [c[1] for c in ACCURACY_COLUMNS],
                        [[s["name"]] + [_cell(s["verify"]["metrics"], k, f) for k, _, f in ACCURACY_COLUMNS]
                         for s in onnx_stages])
        lines += ["", "## Latency (batch 1, greedy, KV cache)", ""]
        lines += _table(["stage", "threads"] + [c[1] for c in LATENCY_COLUMNS],
                        [[s["name"], str(s["verify"]["metrics"].get("threads", "–"))]
                         + [_cell(s["verify"]["metrics"], k, f) for k, _, f in LATENCY_COLUMNS] for s in onnx_stages])
    measured = [s for s in report["stages"] if s.get("memory")]
    if measured:
        lines += ["", "## Memory (peak RSS while the stage was built and verified, against plan's estimate)", ""]
        lines += _table(["stage", "peak RSS GB", "held at start GB", "plan estimate GB", "measured / estimate",
                         "built in this run"],
                        [[s["name"], f"{m['peak_rss_bytes'] / 1e9:.2f}",
                          "–" if not m.get("start_rss_bytes") else f"{m['start_rss_bytes'] / 1e9:.2f}",
                          "–" if not m.get("estimate_bytes") else f"{m['estimate_bytes'] / 1e9:.2f}",
                          "–" if not m.get("estimate_bytes") else f"{m['peak_rss_bytes'] / m['estimate_bytes']:.2f}",
                          "no (cached)" if s["cached"] else "yes"]
                         for s in measured for m in [s["memory"]]])
    failures = [(s["name"], f) for s in report["stages"] for f in s["verify"]["failures"]]
    notes = [(s["name"], n) for s in report["stages"] for n in s["verify"].get("notes", [])]
    if failures:
        lines += ["", "## Verification failures", ""] + [f"- {n}: {f}" for n, f in failures]
    skipped = not_checked(report)
    lines += ["", f"## Not checked ({len(skipped)})", ""]
    lines += [f"- {n}: {item['what']}: {item['why']}" for n, item in skipped] or ["Every check ran."]
    thresholds = [(s["name"], s["verify"].get("thresholds") or {}) for s in report["stages"]]
    if any(t for _, t in thresholds):
        lines += ["", "## Thresholds (effective value, and where it came from)", ""]
        lines += _table(["stage", "threshold", "value", "source"],
                        [[name, key, _threshold(t["value"]), t["source"]]
                         for name, table in thresholds for key, t in table.items()])
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}: {t}" for n, t in notes]
    if report["cache"]["events"]:
        lines += ["", "## Cache events", ""] + [f"- {e['kind']} `{e['key'][:12]}…`: {e['detail']}"
                                                for e in report["cache"]["events"]]
    return "\n".join(lines) + "\n"


def _threshold(value: Any) -> str:
    return "not checked" if value is None else str(value)


def not_checked(report: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """(stage, {what, why}) for every check or step that did not run, across the report's stages."""
    return [(s["name"], item) for s in report["stages"] for item in s["verify"].get("not_checked", [])]


def accuracy_summary(m: dict[str, Any]) -> str:
    """One line for the terminal summary."""
    if "perplexity_ref" in m:
        return (f"ppl {m['perplexity']:.3f} vs {m['perplexity_ref']:.3f} ({m['perplexity_change']:+.1%}), "
                f"KL {m['kl_mean']:.1e}, top-1 {m['top1_agreement']:.1%} (vs original)")
    if "embedding_cosine_min" in m:
        return (f"cos min {m['embedding_cosine_min']:.5f}, hidden Δ {m['hidden_max_abs_diff']:.1e}, "
                f"ranking {'kept' if m['pair_ranking_preserved'] else 'CHANGED'}")
    if "prefill_max_abs_diff" in m:
        return (f"prefill Δ {m['prefill_max_abs_diff']:.1e}, decode Δ {m['decode_max_abs_diff']:.1e}, "
                f"greedy {m['greedy_tokens_matched']}/{m['greedy_tokens_total']}, KL {m['kl_mean']:.1e}, "
                f"top-1 {m['top1_agreement']:.1%}")
    return ""


def speed_summary(m: dict[str, Any]) -> str:
    if "sentences_per_s" in m:
        return (f"{m['sentences_per_s']:.0f} sent/s vs PyTorch {m['baseline_sentences_per_s']:.0f} "
                f"({m['speedup_vs_baseline']:.2f}x)")
    if m.get("decode_tokens_per_s"):
        return (f"{m['decode_tokens_per_s']:.0f} tok/s vs PyTorch {m['baseline_decode_tokens_per_s']:.0f} "
                f"({m['decode_speedup_vs_baseline']:.2f}x)")
    return ""


def write_report(report: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    (folder / "report.md").write_text(render_markdown(report))
