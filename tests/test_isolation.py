"""Each stage runs in a process of its own (pipeline/isolation.py): a stage starts from a fresh interpreter,
not from what earlier stages' libraries left resident, and a stage process that dies is a clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import Pipeline
from pipeline.errors import StageError

from .conftest import ROOT, SHIPPED_MODEL, write_recipe

VERIFY = "\n  greedy_tokens: 4\n  latency: {warmup: 0, repeats: 1, prompt_tokens: 8, decode_tokens: 2}\n"

# a plain script calling the API at module level, no `if __name__ == "__main__":` guard: a stage process must not
# run it again (multiprocessing's spawn would, and wait forever on the run's cache lock)
DRIVER = """
import json, os, sys
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1]) * 1024
from pipeline import Pipeline
before = rss()
result = Pipeline.from_recipe(sys.argv[1], cache_dir=sys.argv[2], isolate=sys.argv[3] == '1').run()
print(json.dumps({"ok": result.ok, "torch_imported": "torch" in sys.modules, "grew": rss() - before,
                  "memory": {s.name: s.memory for s in result.stages}}))
"""


def _drive(tmp_path: Path, isolate: bool) -> dict:
    recipe = write_recipe(tmp_path / "r.yaml", SHIPPED_MODEL, verify=VERIFY)
    env = {k: v for k, v in os.environ.items() if k != "ENGINEWRIGHT_IN_PROCESS"}
    script = tmp_path / "convert.py"
    script.write_text(DRIVER)
    out = subprocess.run([sys.executable, str(script), str(recipe), str(tmp_path / f"cache{int(isolate)}"),
                          "1" if isolate else "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith('{"ok"')]
    assert len(lines) == 1, out.stdout[-3000:]  # the script ran once, not again in a stage's process
    return json.loads(lines[0])


def test_each_stage_starts_from_a_fresh_process_and_the_run_holds_no_model(tmp_path):
    isolated = _drive(tmp_path, isolate=True)
    assert isolated["ok"] and not isolated["torch_imported"]  # the run's own process never touched a model
    for name, memory in isolated["memory"].items():
        assert memory["process"] == "its own", name
        assert memory["start_rss_bytes"] < 200e6, (name, memory)  # an interpreter, not the earlier stages' leftovers
    # the control: in process, a later stage starts with what the export's libraries left resident
    shared = _drive(tmp_path, isolate=False)
    assert shared["torch_imported"] and shared["memory"]["engine"]["process"] == "the run's"
    assert shared["memory"]["engine"]["start_rss_bytes"] > 2 * isolated["memory"]["engine"]["start_rss_bytes"]
    assert shared["grew"] > isolated["grew"] + 100e6


def _children() -> list[int]:
    me = str(os.getpid())
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == me:
            found.append(int(pid))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find the stage's process")
def test_a_stage_process_killed_is_a_stage_error_and_caches_nothing(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", SHIPPED_MODEL, verify=VERIFY)
    cache = tmp_path / "cache"
    Pipeline.from_recipe(recipe, cache_dir=cache, isolate=False).run(until="load")  # load cached: export is next
    caught: list[BaseException] = []

    def run() -> None:
        try:
            Pipeline.from_recipe(recipe, cache_dir=cache, isolate=True).run()
        except BaseException as exc:
            caught.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.time() + 120
    while not _children() and time.time() < deadline:
        time.sleep(0.05)
    for pid in _children():
        os.kill(pid, signal.SIGKILL)  # what the kernel's out-of-memory killer does
    worker.join(300)
    assert len(caught) == 1 and isinstance(caught[0], StageError), caught
    assert "stage 'export': its process ended with signal 9 (SIGKILL: most often the kernel's out-of-memory " \
           "killer)" in str(caught[0])
    entries = [p for p in cache.glob("[0-9a-f][0-9a-f]/*") if p.is_dir()]
    assert len(entries) == 1  # the load stage's entry only
    tmp = cache / ".tmp"
    assert not tmp.exists() or not any(p.is_dir() for p in tmp.iterdir())  # no half-written artifact
