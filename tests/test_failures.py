"""Failures end as stage failures with a report, standard output under --json is one JSON document
whatever a library prints, and a step that did nothing is reported as not checked."""

from __future__ import annotations

import json
import os

import pytest

from pipeline import Pipeline
from pipeline.errors import StageError
from pipeline.logs import stdout_to_stderr

from .conftest import write_recipe


def test_stdout_to_stderr_moves_file_descriptor_writes_too(capfd):
    with stdout_to_stderr() as real:
        os.write(1, b"printed by C code\n")
        print("printed by Python")
        real.write('{"the": "document"}\n')
    out, err = capfd.readouterr()
    assert out == '{"the": "document"}\n'
    assert "printed by C code" in err and "printed by Python" in err
    os.write(1, b"restored\n")
    assert capfd.readouterr().out == "restored\n"


def failed_export(tmp_path, model, monkeypatch, method: str, error: Exception) -> dict:
    """Run a recipe whose export stage's `method` raises `error`; return the report the failed run wrote."""
    from pipeline.stages.export import ExportStage

    def raising(self, *args):
        raise error

    monkeypatch.setattr(ExportStage, method, raising)
    recipe = write_recipe(tmp_path / "r.yaml", model)
    with pytest.raises(StageError, match=f"stage 'export' failed: {type(error).__name__}: {error}") as err:
        Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run()
    report = json.loads((err.value.run_dir / "report.json").read_text())
    assert report["status"] == "failed" and type(error).__name__ in report["traceback"]
    return report


@pytest.mark.slow
def test_any_exception_in_a_stage_ends_as_a_stage_failure_with_a_report(tmp_path, random_llama, monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import main

    report = failed_export(tmp_path, random_llama, monkeypatch, "build", TypeError("unsupported operand inside"))
    assert [s["name"] for s in report["stages"]] == ["load"]  # nothing was cached for export
    recipe = tmp_path / "r.yaml"

    result = CliRunner().invoke(main, ["run", str(recipe), "--json", "--cache-dir", str(tmp_path / "cache")])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1
    assert json.loads(result.stdout)["status"] == "failed"
    assert "Traceback" not in result.stderr and "stage 'export' failed" in result.stderr


METHOD_RECIPES = ["tiny-llama-rtn-w4.yaml", "tiny-llama-gptq-w4.yaml", "tiny-llama-awq-w4.yaml",
                  "tiny-llama-smoothquant-w8a8.yaml", "tiny-llama-bnb-nf4.yaml"]


@pytest.mark.slow
@pytest.mark.parametrize("name", METHOD_RECIPES, ids=[n.removeprefix("tiny-llama-").removesuffix(".yaml")
                                                      for n in METHOD_RECIPES])
def test_run_json_prints_one_document_whatever_the_method_prints(name, method_cli):
    """GPT-QModel printed its banner and INFO lines on stdout, so `run --json` could not be parsed."""
    out = method_cli(name)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["status"] == "ok" and report["stages"][-1]["name"] == "quantize"
    assert not report["stages"][-1]["cached"]


@pytest.mark.slow
def test_attention_fusion_below_opset_23_is_reported_as_not_checked(tmp_path, random_llama):
    recipe = write_recipe(tmp_path / "r.yaml", random_llama, stages="""
  - type: export
    opset: 18
  - type: engine
    intra_op_threads: 1
""")
    result = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run()
    v = result.stage("engine").verify
    assert v["passed"] and v["metrics"]["attention_layers_fused"] == 0
    assert [n["what"] for n in v["not_checked"]] == ["attention fusion"]
    assert "opset 18" in v["not_checked"][0]["why"]


@pytest.mark.slow
def test_an_exception_outside_a_build_is_a_stage_failure_too(tmp_path, random_llama, monkeypatch):
    failed_export(tmp_path, random_llama, monkeypatch, "preflight", PermissionError("cannot read what it needs"))
