"""The pipeline: plan stages and their keys from a recipe, then run only the cache misses."""

from __future__ import annotations

import errno
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import isolation
from .cache import ArtifactCache, Entry
from .context import RunContext
from .errors import EnginewrightError, RecipeError, ResourceError, StageError, VerificationError
from .hashing import sha256_file
from .memory import (
    MemoryPlan,
    available_bytes,
    current_rss_bytes,
    free_disk_bytes,
    gib,
    peak_rss_bytes,
    reset_peak_rss,
    return_freed_memory,
)
from .recipe import STAGE_ORDER, LoadedRecipe, load_recipe
from .registry import load_stage_class, stage_class
from .report import write_report
from .stages.base import Stage
from .target import cpu_fingerprint, package_version
from .verify.result import Verification

DEFAULT_CACHE = "artifacts"
STAGE_NAMES = ("load",) + STAGE_ORDER


@dataclass
class PlannedStage:
    name: str
    key: str
    status: str  # hit | miss | corrupt
    detail: str
    peak_memory_bytes: int  # estimate while building and verifying (pipeline/memory.py)
    disk_bytes: int  # estimate of its artifact's size on disk
    stage: Stage = field(repr=False)


@dataclass
class StageResult:
    name: str
    key: str
    cached: bool
    seconds: float
    artifact: str
    verify: dict[str, Any]
    build_seconds: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # peak RSS of the build and verification against plan's estimate (recorded when the entry was built)
    memory: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key, "cached": self.cached, "seconds": round(self.seconds, 4),
                "build_seconds": self.build_seconds, "artifact": self.artifact, "verify": self.verify,
                "memory": self.memory}


@dataclass
class RunResult:
    report: dict[str, Any]
    stages: list[StageResult]
    run_dir: Path

    @property
    def ok(self) -> bool:
        return self.report["status"] == "ok"

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.name == name)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The artifact cache: the given folder, else $ENGINEWRIGHT_CACHE, else ./artifacts."""
    return Path(cache_dir or os.environ.get("ENGINEWRIGHT_CACHE") or DEFAULT_CACHE)


class Pipeline:
    def __init__(self, recipe: LoadedRecipe, cache_dir: str | Path | None = None,
                 say: Callable[[str], None] | None = None, gpu_probe: Callable[[], Any] | None = None,
                 isolate: bool | None = None):
        self.recipe = recipe
        self.cache = ArtifactCache(cache_root(cache_dir))
        self.say = say or (lambda msg: None)
        self.gpu_probe = gpu_probe  # injected GPU fingerprint (tests); pipeline.gpu.detect_gpu otherwise
        # each stage built and verified in a process of its own, so what one stage's libraries never free
        # does not stay resident through the next (pipeline/isolation.py); $ENGINEWRIGHT_IN_PROCESS=1 or
        # isolate=False runs them in this process (what a test that monkeypatches a stage needs)
        if isolate is None:
            isolate = os.environ.get("ENGINEWRIGHT_IN_PROCESS", "") not in ("1", "true", "yes")
        self.isolate = isolate

    @classmethod
    def from_recipe(cls, path: str | Path, cache_dir: str | Path | None = None,
                    say: Callable[[str], None] | None = None,
                    gpu_probe: Callable[[], Any] | None = None, isolate: bool | None = None) -> Pipeline:
        return cls(load_recipe(path), cache_dir, say, gpu_probe, isolate)

    # ---- planning ----------------------------------------------------------------------
    def _stages(self, ctx: RunContext) -> list[Stage]:
        stages: list[Stage] = [load_stage_class()(self.recipe.recipe.model, ctx)]
        stages += [stage_class(spec)(spec, ctx) for spec in self.recipe.recipe.stages]
        return stages

    def _context(self, planning: bool = False) -> RunContext:
        return RunContext(recipe=self.recipe, cache=self.cache, say=self.say, planning=planning,
                          gpu_probe=self.gpu_probe)

    def plan(self, until: str | None = None) -> list[PlannedStage]:
        """Every stage with its key and whether the cache holds it. Loads no model. A model folder
        holding only config.json is planned with sizes estimated from the config."""
        from .explain import explain_miss

        ctx = self._context(planning=True)
        planned, parent_key = [], None
        stages = self._select(self._stages(ctx), until)
        budget = MemoryPlan(stages[0].info())  # type: ignore[attr-defined]
        for stage in stages:
            key = stage.key(parent_key)
            status, detail = self.cache.check(key)
            need, disk = budget.estimate(stage), budget.disk(stage)
            budget.passed(stage, built=status != "hit")
            if status == "miss":
                detail = explain_miss(self.cache, stage.key_material(parent_key)) or detail
            note = stage.plan_note()
            if note:
                detail = f"{detail}; {note}"
            planned.append(PlannedStage(stage.name, key, status, detail, need, disk, stage))
            parent_key = key
        return planned

    def gpu_estimate(self, planned: list[PlannedStage]):
        """Weights per precision, KV cache at the TensorRT profiles' max shapes and the verdict against
        the target GPU (pipeline/gpu_estimate.py); None for encoders."""
        from .gpu_estimate import estimate

        load: Any = planned[0].stage
        tensorrt = getattr(self.recipe.recipe.stage("engine"), "backend", None) == "tensorrt"
        return estimate(self.recipe.recipe, load.info(), load.ctx.gpu() if tensorrt else None)

    def _check_memory(self, stage: Stage, need: int) -> None:
        have = available_bytes()
        if have is not None and need > have:
            raise ResourceError(
                f"stage '{stage.name}' needs about {gib(need)} of memory for {self.recipe.recipe.model.path} "
                f"(pipeline/memory.py: its weights x {stage.memory_multiple()}, or the PyTorch reference where it "
                f"computes it) and this machine has {gib(have)} available; "
                "run it on a larger machine, or pass check_memory=False / --no-memory-check to try anyway"
            )

    def _check_disk(self, stage: Stage, need: int) -> None:
        free = free_disk_bytes(self.cache.root)
        if free is not None and need > free:
            raise ResourceError(
                f"stage '{stage.name}' writes an artifact of about {gib(need)} under {self.cache.root} and that disk "
                f"has {gib(free)} free; free space (`enginewright cache gc --max-size-mb N` drops the oldest "
                "entries), point --cache-dir at a larger disk, or pass check_memory=False / --no-memory-check "
                "to try anyway")

    def _select(self, stages: list[Stage], until: str | None) -> list[Stage]:
        if until is None:
            return stages
        names = [s.name for s in stages]
        if until not in names:
            raise RecipeError(f"{self.recipe.path}: --until {until!r} names no stage of this recipe; "
                              f"its stages are {', '.join(names)}")
        return stages[: names.index(until) + 1]

    # ---- running -----------------------------------------------------------------------
    def run(self, force: str | None = None, until: str | None = None, check_memory: bool = True) -> RunResult:
        """Run the recipe. `force` rebuilds that stage and every stage after it.

        Before a stage is built, its peak-memory estimate is checked against the memory available
        (unless check_memory is False)."""
        ctx = self._context()
        stages = self._select(self._stages(ctx), until)
        names = [s.name for s in stages]
        if force is not None and force not in names:
            raise RecipeError(f"{self.recipe.path}: --force {force!r} names no stage of this recipe; "
                              f"its stages are {', '.join(names)}")
        forced = set(names[names.index(force):]) if force else set()
        started = time.time()
        self.cache.root.mkdir(parents=True, exist_ok=True)
        self.cache.sweep_tmp()
        results: list[StageResult] = []
        error: EnginewrightError | None = None
        parent: Entry | None = None
        current = stages[0].name
        try:
            budget = MemoryPlan(stages[0].info())  # type: ignore[attr-defined]
            if self.gpu_probe is not None:
                ctx.gpu()  # an injected probe cannot cross into a stage's process; its answer does
            arrived: list[str] = []
            for index, stage in enumerate(stages):
                current = stage.name
                need, disk = budget.estimate(stage), budget.disk(stage)
                result, parent = self._run_stage(stage, parent, stage.name in forced, (need, disk), check_memory,
                                                 index, tuple(arrived))
                budget.passed(stage, built=not result.cached)
                results.append(result)
                if parent is not None:
                    ctx.arrived(parent)  # later stages read it; it may name the model they are checked against
                    arrived.append(parent.key)
                if not result.verify["passed"]:
                    raise VerificationError(stage.name, result.verify["failures"], result.verify["metrics"])
        except EnginewrightError as exc:
            error = exc
        except Exception as exc:  # outside a build (keys, the cache, a preflight): still a stage failure
            error = StageError(f"stage '{current}' failed: {type(exc).__name__}: {exc} (the traceback is in "
                               "report.json)")
            error.traceback = traceback.format_exc()  # type: ignore[attr-defined]
        report = self._report(results, started, error)
        report["imports"] = ctx.imports()
        run_dir = self.cache.root / "runs" / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{self.recipe.recipe.name}"
        write_report(report, run_dir)
        if error is not None:
            error.run_dir = run_dir  # type: ignore[attr-defined]
            error.report = report  # type: ignore[attr-defined]
            raise error
        return RunResult(report=report, stages=results, run_dir=run_dir)

    def _run_stage(self, stage: Stage, parent: Entry | None, forced: bool,
                   needs: tuple[int, int], check_memory: bool, index: int = 0,
                   upstream: tuple[str, ...] = ()) -> tuple[StageResult, Entry | None]:
        """Look the stage up, or build, verify and commit it; `needs` is its (peak memory, disk) estimate."""
        t0 = time.perf_counter()
        need, disk = needs
        key = stage.key(parent.key if parent else None)
        entry = None if forced else self.cache.lookup(key)
        if entry is None:
            with self.cache.lock(key):
                entry = None if forced else self.cache.lookup(key)  # another process may have built it
                if entry is None:
                    stage.preflight()  # a stage this machine cannot run stops here; earlier entries stay
                    if check_memory:
                        self._check_memory(stage, need)
                        self._check_disk(stage, disk)
                    self.say(f"{stage.name}: building")
                    with self.cache.building(key) as tmp:
                        if self.isolate:
                            job = isolation.StageJob(self.recipe, self.cache.root, index,
                                                     parent.key if parent else None, upstream, tmp,
                                                     stage.ctx.portable_state())
                            (stage_meta, verification), learned, child = isolation.run_in_child(
                                job, self.say, f"stage '{stage.name}'")
                            stage.ctx.absorb(learned)
                            peak, start_rss, windowed = (child["peak_rss_bytes"], child["start_rss_bytes"],
                                                         child["windowed"])
                        else:
                            return_freed_memory()  # what earlier stages freed is not counted as this one's
                            windowed = reset_peak_rss()
                            start_rss = current_rss_bytes()  # what the process already held: imports, earlier stages
                            stage_meta, verification = self._build_and_verify(stage, parent, tmp)
                            peak = peak_rss_bytes()
                        seconds = time.perf_counter() - t0
                        memory = {"peak_rss_bytes": peak, "start_rss_bytes": start_rss,
                                  "scope": "this stage's build and verification" if windowed else "the process",
                                  "process": "its own" if self.isolate else "the run's",
                                  "estimate_bytes": need, "disk_estimate_bytes": disk}
                        if not verification.passed:
                            shutil.rmtree(tmp, ignore_errors=True)  # a failed artifact is never cached
                            return StageResult(stage.name, key, False, seconds, "(not kept: failed verification)",
                                               verification.to_dict(), meta=stage_meta, memory=memory), None
                        meta: dict[str, Any] = {
                            "stage": stage.name, "key": key, "parent": parent.key if parent else None,
                            "key_material": stage.key_material(parent.key if parent else None),
                            "stage_meta": stage_meta, "verify": verification.to_dict(),
                            "build_seconds": round(seconds, 3), "memory": memory, "created": time.time(),
                            "recipe": self.recipe.recipe.name,
                        }
                        entry = self.cache.commit(key, tmp, meta)
                    return StageResult(stage.name, key, False, time.perf_counter() - t0, stage.describe(entry),
                                       meta["verify"], build_seconds=meta["build_seconds"], meta=stage_meta,
                                       memory=memory), entry
        self.say(f"{stage.name}: cached")
        return StageResult(stage.name, key, True, time.perf_counter() - t0, stage.describe(entry),
                           entry.meta["verify"], build_seconds=entry.meta.get("build_seconds"),
                           meta=entry.meta.get("stage_meta", {}), memory=entry.meta.get("memory")), entry

    def _build_and_verify(self, stage: Stage, parent: Entry | None, tmp: Path) -> tuple[dict[str, Any], Verification]:
        """Build and verify one stage. Whatever a stage or a library under it raises ends as a stage error
        with the stage's name (the run then writes its report and exits 1), never as a traceback."""
        try:
            stage_meta = stage.build(parent, tmp)
            verification = stage.verify(parent, tmp, stage_meta)
        except EnginewrightError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise StageError(
                    f"stage '{stage.name}' could not write its artifact under {self.cache.root}: "
                    f"{exc.strerror or exc}; free disk space or point --cache-dir at a larger disk "
                    "(nothing was cached for this stage)") from exc
            raise StageError(f"stage '{stage.name}' failed: {type(exc).__name__}: {exc} (nothing was cached for "
                             "this stage)") from exc
        except Exception as exc:
            error = StageError(f"stage '{stage.name}' failed: {type(exc).__name__}: {exc} (nothing was cached for "
                               "this stage; the traceback is in report.json)")
            error.traceback = traceback.format_exc()  # type: ignore[attr-defined]
            raise error from exc
        policy = stage.thresholds()
        if policy is not None:
            verification.thresholds = policy.to_dict()
        return stage_meta, verification

    def _report(self, results: list[StageResult], started: float, error: Exception | None) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "status": "ok" if error is None else "failed",
            "error": str(error) if error is not None else None,
            "traceback": getattr(error, "traceback", None),
            "recipe": {"name": self.recipe.recipe.name, "path": str(self.recipe.path),
                       "sha256": sha256_file(self.recipe.path)},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": round(time.time() - started, 3),
            "host": {
                "cpu": cpu_fingerprint(),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "packages": {p: package_version(p) for p in ("torch", "transformers", "onnx", "onnxruntime",
                                                              "onnxscript", "onnxslim", "onnxsim")},
            },
            "cache": {"root": str(self.cache.root),
                      "events": [e.__dict__ for e in self.cache.events]},
            "stages": [r.to_dict() for r in results],
        }
