"""Benchmark outputs: results.json, results.md (readable tables), chart.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _f(value: Any, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def markdown(data: dict[str, Any]) -> str:
    wl = data["workloads"]
    m = data["machine"]
    batch = wl["batch"]
    lines = [
        "# enginewright benchmark", "",
        f"Machine: {m['cpu']['model']}, {m['cores']} cores ({', '.join(m['cpu']['isa'])}); memory bandwidth "
        f"{m['memory_bandwidth_gb_s']:.1f} GB/s ({m['bandwidth_method']}); other processes used "
        f"{m['other_processes_cpu_share']:.1%} of the CPU during the {data['seconds_measuring']:.0f} s of measurement.",
        "",
        f"Workloads: batch-1 decode ({wl['prompt']}-token prompt, {wl['new']} greedy tokens), batch-{batch} decode "
        f"(same lengths), {wl['prefill']}-token prefill; {wl['reps']} repetitions, interleaved across engines. "
        "Speed-up is decode tokens/s over PyTorch eager at the same thread count; agreement is the share of "
        "PyTorch's greedy tokens reproduced before the first difference.",
    ]
    for model in dict.fromkeys(r["model"] for r in data["rows"]):
        lines += ["", f"## {model}", "",
                  f"| engine | threads | decode tok/s | speed-up | TTFT ms | step p50 / p90 / p99 ms | "
                  f"batch-{batch} tok/s | prefill ms | peak RSS MB | size MB | agreement | roofline |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in data["rows"] if r["model"] == model), key=lambda r: (r["threads"], r["family"])):
            d = r["decode_b1"]
            lines.append(
                f"| {r['engine']} | {r['threads']} | {d['tokens_per_s']:.1f} | {_f(r.get('speedup_vs_pytorch'), '{:.2f}x')} "
                f"| {d['ttft_ms']:.2f} | {d['step_ms_p50']:.3f} / {d['step_ms_p90']:.3f} / {d['step_ms_p99']:.3f} "
                f"| {r[f'decode_b{batch}']['tokens_per_s']:.1f} | {r['prefill_ms']:.2f} | {r['peak_rss_mb']:.0f} "
                f"| {r['size_mb']:.1f} | {_f(r.get('greedy_agreement'), '{:.0%}')} | {r['roofline_ratio']:.3f} |")
    lines += ["", "## Targets (ratios from this run; reported, not asserted)", "", "| target | ratio | goal | met |",
              "|---|---|---|---|"]
    for t in data["targets"]:
        met = "–" if t["met"] is None else ("yes" if t["met"] else "no")
        extra = f" ({t['engine']})" if t.get("engine") else ""
        lines.append(f"| {t['target']}{extra} | {_f(t['ratio'], '{:.2f}')} | {t['goal']} | {met} |")
    if data["failures"]:
        lines += ["", "## Failures", ""] + [f"- {k}: {v}" for k, v in data["failures"].items()]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    lines += ["", "Roofline: weight bytes read per batch-1 decode step (the engine's weights less the embedding "
              "table) times tokens/s, over the memory bandwidth of a one-thread copy measured in the same run; with "
              "more threads an engine can draw more bandwidth than one thread does, so ratios above 1 are possible."]
    return "\n".join(lines) + "\n"


def chart(data: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(dict.fromkeys(r["model"] for r in data["rows"]))
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(6 * (len(models) + 1), 4.5))
    colors = {"baseline": "#888888", "enginewright": "#1f77b4", "peer": "#ff7f0e"}
    for ax, model in zip(axes, models):
        rows = sorted((r for r in data["rows"] if r["model"] == model and r["threads"] == 1),
                      key=lambda r: r["decode_b1"]["tokens_per_s"])
        ax.barh([r["engine"] for r in rows], [r["decode_b1"]["tokens_per_s"] for r in rows],
                color=[colors[r["family"]] for r in rows])
        ax.set_title(f"{model}: decode tokens/s (batch 1, 1 thread)")
        ax.set_xlabel("tokens/s")
    ax = axes[-1]
    big = models[-1]
    rows = sorted((r for r in data["rows"] if r["model"] == big), key=lambda r: r["roofline_ratio"])
    ax.barh([f"{r['engine']} ({r['threads']}t)" for r in rows], [r["roofline_ratio"] for r in rows],
            color=[colors[r["family"]] for r in rows])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_title(f"{big}: roofline ratio")
    ax.set_xlabel("achieved weight bytes/s over memory bandwidth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(data: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "results.json", out_dir / "results.md"]
    files[0].write_text(json.dumps(data, indent=2) + "\n")
    files[1].write_text(markdown(data))
    png = out_dir / "chart.png"
    if chart(data, png):
        files.append(png)
    else:
        data["notes"].append("chart.png not written: matplotlib is not installed (pip install '.[bench]')")
        files[1].write_text(markdown(data))
    return files
