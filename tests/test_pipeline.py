"""The whole path on the shipped model, and the behaviour of the cache across runs."""

import json
import subprocess
import sys

import pytest

from pipeline import Pipeline
from pipeline.errors import VerificationError

from .conftest import DEFAULT_RECIPE, ROOT, SHIPPED_MODEL, write_recipe

pytestmark = pytest.mark.slow

REQUIRED = ("prefill_max_abs_diff", "decode_max_abs_diff", "greedy_tokens_matched", "greedy_tokens_total")
ENGINE = ("decode_tokens_per_s", "baseline_decode_tokens_per_s", "decode_step_ms_p50", "decode_step_ms_p90",
          "decode_step_ms_p99", "prefill_ms")


def test_default_recipe_builds_and_verifies(shipped_run):
    result, _ = shipped_run
    assert result.ok
    assert [s.name for s in result.stages] == ["load", "export", "simplify", "engine"]
    for s in result.stages:
        assert not s.cached and s.verify["passed"]
    for name in ("export", "simplify", "engine"):
        m = result.stage(name).verify["metrics"]
        assert all(k in m for k in REQUIRED)
        assert m["prefill_max_abs_diff"] <= 1e-4 and m["decode_max_abs_diff"] <= 1e-4
        assert m["greedy_tokens_matched"] == m["greedy_tokens_total"] == 32
    m = result.stage("engine").verify["metrics"]
    assert all(m[k] > 0 for k in ENGINE)
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["stages"][3]["verify"]["metrics"]["greedy_tokens_total"] == 32
    assert "| engine |" in (result.run_dir / "report.md").read_text()
    for s in report["stages"]:  # every build measured its peak RSS, beside plan's estimate
        assert s["memory"]["peak_rss_bytes"] > 100e6 and s["memory"]["estimate_bytes"] > 300e6
    assert "## Memory (peak RSS" in (result.run_dir / "report.md").read_text()


def test_second_run_is_all_hits_and_loads_no_model(shipped_run, monkeypatch):
    _, cache = shipped_run
    import pipeline.runtime.torch_lm as torch_lm

    def refuse(*a, **k):
        raise AssertionError("a cache hit must not load the model")

    monkeypatch.setattr(torch_lm, "load_hf_causal_lm", refuse)
    result = Pipeline.from_recipe(DEFAULT_RECIPE, cache_dir=cache).run()
    assert all(s.cached for s in result.stages)
    assert all(s.memory and s.memory["peak_rss_bytes"] > 0 for s in result.stages)  # kept from the build
    plan = Pipeline.from_recipe(DEFAULT_RECIPE, cache_dir=cache).plan()
    assert [p.status for p in plan] == ["hit"] * 4


def test_changed_stage_config_misses_only_downstream(shipped_run, tmp_path):
    _, cache = shipped_run
    text = DEFAULT_RECIPE.read_text().replace("tool: onnxslim", "tool: none").replace(
        "../models/tiny-llama", str(SHIPPED_MODEL))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    plan = Pipeline.from_recipe(recipe, cache_dir=cache).plan()
    assert [p.status for p in plan] == ["hit", "hit", "miss", "miss"]


def test_verification_failure_fails_the_stage_and_caches_nothing(tmp_path, random_llama):
    recipe = write_recipe(tmp_path / "r.yaml", random_llama, stages="\n  - type: export\n",
                          verify="\n  prefill_atol: 1.0e-30\n  greedy_tokens: 4\n"
                                 "  latency: {warmup: 0, repeats: 1, prompt_tokens: 8, decode_tokens: 2}\n")
    pipe = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache")
    with pytest.raises(VerificationError, match="prefill logits differ"):
        pipe.run()
    assert [p.status for p in pipe.plan()] == ["hit", "miss"]
    reports = list((tmp_path / "cache" / "runs").glob("*/report.json"))
    report = json.loads(reports[0].read_text())
    assert report["status"] == "failed" and not report["stages"][1]["verify"]["passed"]


def test_corrupted_engine_is_rebuilt(tmp_path, random_llama):
    recipe = write_recipe(tmp_path / "r.yaml", random_llama)
    cache = tmp_path / "cache"
    first = Pipeline.from_recipe(recipe, cache_dir=cache).run()
    engine = first.stage("engine").artifact
    with open(engine, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    second = Pipeline.from_recipe(recipe, cache_dir=cache).run()
    assert [s.cached for s in second.stages] == [True, True, True, False]
    assert second.report["cache"]["events"][0]["kind"] == "corrupt"
    forced = Pipeline.from_recipe(recipe, cache_dir=cache).run(force="simplify")
    assert [s.cached for s in forced.stages] == [True, True, False, False]


def test_onnxsim_variant(tmp_path, random_llama):
    recipe = write_recipe(tmp_path / "r.yaml", random_llama,
                          stages="\n  - type: export\n  - type: simplify\n    tool: onnxsim\n")
    result = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run()
    assert result.stage("simplify").verify["passed"]


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_json_and_plan(shipped_run):
    _, cache = shipped_run
    out = _cli("run", str(DEFAULT_RECIPE), "--json", "--cache-dir", str(cache))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [s["cached"] for s in report["stages"]] == [True] * 4
    plan = _cli("plan", str(DEFAULT_RECIPE), "--cache-dir", str(cache))
    assert plan.returncode == 0 and plan.stdout.count(" hit ") == 4
    ls = _cli("cache", "ls", "--cache-dir", str(cache))
    assert ls.returncode == 0 and "engine" in ls.stdout


def test_cli_bad_input_exit_code_2(tmp_path):
    bad = ROOT / "tests" / "bad_recipes" / "unknown-stage-field.yaml"
    out = _cli("run", str(bad), "--cache-dir", str(tmp_path))
    assert out.returncode == 2
    assert "stages.0.opsett" in out.stderr and "Traceback" not in out.stderr
    missing = write_recipe(tmp_path / "r.yaml", tmp_path / "no-model")
    out = _cli("plan", str(missing), "--cache-dir", str(tmp_path))
    assert out.returncode == 2 and "model folder not found" in out.stderr
