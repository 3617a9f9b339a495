"""Smoke test of `enginewright bench --quick` on the tiny model: every output is written and every
engine this project builds reports a speed and an agreement. No speed is asserted here."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


def test_quick_bench_writes_json_table_and_chart(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench", "--quick", "--out", str(out),
                           "--cache-dir", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    engines = {r["engine"] for r in data["rows"]}
    assert {"pytorch-eager", "enginewright-fp32", "enginewright-int8-dynamic", "enginewright-int8-qdq",
            "genai-fp32", "genai-int4"} <= engines
    assert (out / "chart.png").stat().st_size > 10_000
    for row in data["rows"]:
        assert row["decode_b1"]["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert 0.0 <= row["greedy_agreement"] <= 1.0
    fp32 = next(r for r in data["rows"] if r["engine"] == "enginewright-fp32")
    assert fp32["greedy_agreement"] == 1.0, "the FP32 engine reproduces PyTorch's greedy tokens"
    assert "| enginewright-fp32 |" in (out / "results.md").read_text()
    assert data["targets"] and data["machine"]["memory_bandwidth_gb_s"] > 0
