"""Each stage's build and verification in a process of its own.

A stage loads a PyTorch model, traces it, opens ONNX Runtime sessions; some of what those libraries
allocate is never handed back to the system (the exporter keeps parameter storages alive, glibc keeps
fragmented heap, quantization libraries keep caches). In one process that memory is carried into every
later stage. A child process takes it with it when it exits, so a stage starts from a fresh interpreter
and its peak is its own.

The child is a fresh interpreter, not a fork: a fork of a process whose thread pools have run (PyTorch's
OpenMP workers after any parallel op, ONNX Runtime's) hangs in the child the first time it waits on them
(measured: the first parallel torch op in a forked child deadlocks). Nor is it multiprocessing's spawn,
which re-runs the caller's main script in the child: a script that calls `Pipeline(...).run()` without an
`if __name__ == "__main__":` guard would run again there and wait forever on the cache lock its parent
holds (measured). The child is `python -c` importing this module, fed the job over a pipe. It rebuilds the
pipeline from the recipe, looks up the upstream entries in the cache, and runs the one stage; what it
learned that later stages reuse (the PyTorch reference outputs, baselines, the tokenizer) comes back with
the result, and its progress messages come back as they are said. Models never cross.

What a child cannot see: changes made to modules in the parent at run time (a test's monkeypatch). Those
runs pass isolate=False, or set ENGINEWRIGHT_IN_PROCESS=1.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StageError


@dataclass(frozen=True)
class StageJob:
    """What a child needs to run stage `index` of a recipe: everything is rebuilt from these."""

    recipe: Any  # LoadedRecipe
    cache_root: Path
    index: int  # into the pipeline's stages (0: load)
    parent_key: str | None
    upstream: tuple[str, ...]  # cache keys of the entries that arrived before this stage, in order
    tmp: Path  # the entry being built
    state: dict[str, Any]  # RunContext.portable_state() of the parent


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling; else a StageError with its text and traceback."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        error = StageError(f"{type(exc).__name__}: {exc}")
        error.traceback = getattr(exc, "traceback", None) or traceback.format_exc()  # type: ignore[attr-defined]
        return error


def _child(job: StageJob, conn: Any) -> None:
    from .memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss

    signal.signal(signal.SIGINT, signal.default_int_handler)
    windowed = reset_peak_rss()
    start = current_rss_bytes()
    try:
        from .pipeline import Pipeline

        pipe = Pipeline(job.recipe, job.cache_root, say=lambda msg: conn.send(("say", msg)), isolate=False)
        ctx = pipe._context()
        ctx.absorb(job.state)
        for key in job.upstream:
            entry = pipe.cache.lookup(key)
            if entry is None:
                raise StageError(f"the upstream cache entry {key} vanished while this run used it")
            ctx.arrived(entry)
        stage = pipe._stages(ctx)[job.index]
        parent = pipe.cache.lookup(job.parent_key) if job.parent_key else None
        value = pipe._build_and_verify(stage, parent, job.tmp)
        payload: tuple = ("ok", value, ctx.portable_state())
    except BaseException as exc:
        payload = ("error", _portable(exc), None)
    memory = {"peak_rss_bytes": peak_rss_bytes(), "start_rss_bytes": start, "windowed": windowed}
    try:
        conn.send(payload + (memory,))
    except Exception as exc:  # a result that cannot be pickled is the stage's failure, said so
        conn.send(("error", StageError(f"the stage's result could not be sent back from its process: {exc}"),
                   None, memory))
    finally:
        conn.close()


_FDS = "ENGINEWRIGHT_STAGE_FDS"


def child_main() -> None:
    """The child's entry point: read (sys.path, job) from the job pipe, run it, answer on the result pipe."""
    from multiprocessing.connection import Connection

    job_fd, result_fd = (int(fd) for fd in os.environ.pop(_FDS).split(","))
    with Connection(job_fd, writable=False) as jobs:
        path, job = jobs.recv()
    sys.path[:] = path
    _child(job, Connection(result_fd, readable=False))


def run_in_child(job: StageJob, say: Any, what: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Run the job in a fresh interpreter; return (its value, what its context learned, its memory figures).
    An exception in the child is raised here; a child that dies without a word (killed for memory, a crash
    in native code) is a StageError naming how it ended."""
    from multiprocessing.connection import Connection

    job_read, job_write = os.pipe()
    result_read, result_write = os.pipe()
    here = str(Path(__file__).resolve().parents[1])  # the folder this package is imported from
    env = {**os.environ, _FDS: f"{job_read},{result_write}",
           "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    try:
        child = subprocess.Popen([sys.executable, "-B", "-c", "from pipeline.isolation import child_main; child_main()"],
                                 pass_fds=(job_read, result_write), env=env)
    finally:
        os.close(job_read)
        os.close(result_write)
    recv = Connection(result_read, writable=False)
    try:
        try:
            with Connection(job_write, readable=False) as jobs:
                jobs.send((list(sys.path), job))
            while True:
                message = recv.recv()
                if message[0] != "say":
                    break
                say(message[1])
        except (EOFError, BrokenPipeError):
            code = child.wait()
            died = f"signal {-code}" if code < 0 else f"exit code {code}"
            hint = " (SIGKILL: most often the kernel's out-of-memory killer)" if code == -signal.SIGKILL else ""
            raise StageError(f"{what}: its process ended with {died}{hint} before reporting a result; nothing "
                             "was cached for this stage") from None
    except BaseException:
        if child.poll() is None:
            child.terminate()
        child.wait()
        raise
    finally:
        recv.close()
    child.wait()
    kind, value, learned, memory = message
    if kind == "error":
        raise value
    return value, learned, memory
