"""Whatever goes wrong, no half-written artifact is served and a rerun picks up where it stopped."""

import json
import resource
import signal
import subprocess
import sys
import time

import pytest

from pipeline import Pipeline
from pipeline.cache import ArtifactCache
from pipeline.errors import ResourceError

from .conftest import ROOT, write_recipe

pytestmark = pytest.mark.slow


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _assert_cache_consistent(cache_dir):
    store = ArtifactCache(cache_dir)
    for entry in store.entries():
        assert store.check(entry.key)[0] == "hit", f"half-written or damaged entry {entry.path}"


def _kill_when(proc, marker, delay):
    for line in proc.stderr:
        if marker in line:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
    proc.wait()
    return False


@pytest.mark.parametrize("delay", [0.0, 1.5])
def test_sigkill_during_each_stage_then_resume(tmp_path, random_llama, delay):
    recipe = write_recipe(tmp_path / "r.yaml", random_llama)
    cache = tmp_path / "cache"
    finished = []
    killed = 0
    for stage in ("load", "export", "simplify", "engine"):
        if stage in finished:  # a late kill can land after this stage already finished
            continue
        proc = _cli("run", str(recipe), "--cache-dir", str(cache))
        if _kill_when(proc, f"{stage}: building", delay):
            killed += 1
        else:
            assert proc.returncode == 0, f"never reached {stage}"
        _assert_cache_consistent(cache)
        plan = Pipeline.from_recipe(recipe, cache_dir=cache).plan()
        statuses = {p.name: p.status for p in plan}
        assert all(statuses[s] == "hit" for s in finished), "finished stages survive the kill"
        assert statuses[stage] in ("miss", "hit")
        assert "corrupt" not in statuses.values()
        finished = [p.name for p in plan if p.status == "hit"]
    assert killed >= 2
    result = Pipeline.from_recipe(recipe, cache_dir=cache).run()
    assert result.ok
    assert [s.cached for s in result.stages][: len(finished)] == [True] * len(finished)
    assert not any((cache / ".tmp").iterdir()), "unfinished builds of killed runs are swept"


def test_two_processes_same_recipe_build_each_stage_once(tmp_path, random_llama):
    recipe = write_recipe(tmp_path / "r.yaml", random_llama)
    cache = tmp_path / "cache"
    procs = [_cli("run", str(recipe), "--json", "--cache-dir", str(cache)) for _ in range(2)]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        reports.append(json.loads(out))
    for i in range(4):
        built = [not r["stages"][i]["cached"] for r in reports]
        assert sum(built) == 1, f"stage {reports[0]['stages'][i]['name']} built {sum(built)} times"
        assert reports[0]["stages"][i]["key"] == reports[1]["stages"][i]["key"]
    _assert_cache_consistent(cache)


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


def test_full_disk_fails_the_stage_cleanly(tmp_path, random_llama):
    recipe = write_recipe(tmp_path / "r.yaml", random_llama)
    cache = tmp_path / "cache"
    proc = _cli("run", str(recipe), "--cache-dir", str(cache), preexec_fn=_limit_file_size)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1
    assert "could not write its artifact" in err and "Traceback" not in err
    _assert_cache_consistent(cache)
    assert not any((cache / ".tmp").iterdir())
    statuses = [p.status for p in Pipeline.from_recipe(recipe, cache_dir=cache).plan()]
    assert statuses == ["hit", "miss", "miss", "miss"]
    assert Pipeline.from_recipe(recipe, cache_dir=cache).run().ok, "with space again, the rerun completes"


def test_memory_estimate_refuses_before_building(tmp_path, random_llama, monkeypatch):
    import pipeline.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "available_bytes", lambda: 1024**2)
    recipe = write_recipe(tmp_path / "r.yaml", random_llama)
    pipe = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache")
    with pytest.raises(ResourceError, match="stage 'load' needs about .* GiB of memory"):
        pipe.run()
    assert [p.status for p in pipe.plan()] == ["miss"] * 4
    planned = {p.name: p.peak_memory_bytes for p in pipe.plan()}
    assert planned["load"] > 1024**3 and planned["export"] > 1024**3  # PyTorch's own overhead
    assert 256 * 1024**2 < planned["simplify"] < 1024**3  # ONNX only: export computed the PyTorch reference


def test_disk_estimate_refuses_before_writing(tmp_path, random_llama, monkeypatch):
    import pipeline.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "free_disk_bytes", lambda folder: 1)
    recipe = write_recipe(tmp_path / "r.yaml", random_llama)
    pipe = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache")
    with pytest.raises(ResourceError, match=r"stage 'export' writes an artifact of about .* GiB under .* 0\.00 GiB free"):
        pipe.run()  # load writes no weights of its own, so it is built; export's float32 graph is refused
    assert [p.status for p in pipe.plan()] == ["hit", "miss", "miss", "miss"]
    disk = {p.name: p.disk_bytes for p in pipe.plan()}
    assert disk["load"] == 0 and disk["export"] == disk["simplify"] > 0
    assert not any((tmp_path / "cache" / ".tmp").iterdir())


def test_simplifier_too_large_is_skipped_with_a_note(tmp_path, random_llama, monkeypatch):
    import pipeline.stages.simplify as simplify

    monkeypatch.setattr(simplify, "PROTOBUF_LIMIT", 1)
    recipe = write_recipe(tmp_path / "r.yaml", random_llama,
                          stages="\n  - type: export\n  - type: simplify\n    tool: onnxsim\n")
    result = Pipeline.from_recipe(recipe, cache_dir=tmp_path / "cache").run()
    v = result.stage("simplify").verify
    assert v["passed"]
    assert [n["what"] for n in v["not_checked"]] == ["simplification (onnxsim)"]
    assert "2 GB" in v["not_checked"][0]["why"]
    assert "## Not checked (1)" in (result.run_dir / "report.md").read_text()
