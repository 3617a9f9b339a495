"""The stage contract: a typed config in, a folder of files out, a verification record.

A stage never writes into the cache itself: the pipeline hands it a fresh temporary folder,
and commits that folder only if the stage returned and its verification passed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..cache import Entry
from ..context import RunContext
from ..hashing import chain_key
from ..target import package_version


@dataclass
class Verification:
    passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "metrics": self.metrics, "failures": self.failures, "notes": self.notes}


class Stage(ABC):
    name: ClassVar[str]
    version: ClassVar[int] = 1
    target_specific: ClassVar[bool] = False
    # distributions whose versions change what the stage produces: part of the key
    tools: ClassVar[tuple[str, ...]] = ()
    # whether the recipe's verify section shapes this stage's verification: part of the key
    verified: ClassVar[bool] = True
    # peak memory while building and verifying, as a multiple of the float32 weights (pipeline/memory.py)
    memory_factor: ClassVar[float] = 3.0

    def __init__(self, spec: Any, ctx: RunContext):
        self.spec = spec
        self.ctx = ctx

    @property
    def verify_spec(self):
        """This stage's thresholds (recipe verify section plus earlier stages' overrides)."""
        return self.ctx.recipe.recipe.verify_for(self.name)

    def config(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json") if self.spec is not None else {}

    def target(self) -> dict[str, Any] | None:
        return None

    def key_material(self, parent_key: str | None) -> dict[str, Any]:
        material: dict[str, Any] = {
            "parent": parent_key,
            "stage": self.name,
            "stage_version": self.version,
            "config": self.config(),
            "tools": {t: package_version(t) for t in self.tools},
        }
        if self.target_specific:
            material["target"] = self.target()
        if self.verified:
            material["verify"] = self.verify_spec.model_dump(mode="json")
        calibration = getattr(self.spec, "calibration", None)
        if calibration is not None:  # the text's content, not its name, decides what calibration sees
            from ..calibration import text_identity

            where = f"{self.ctx.recipe.path}: stages.{self.name}.calibration"
            material["calibration_text"] = text_identity(calibration.text, self.ctx.recipe.path.parent, where=where)
        return material

    def key(self, parent_key: str | None) -> str:
        return chain_key(self.key_material(parent_key))

    def preflight(self) -> None:
        """Raise ResourceError if this machine cannot build the stage (called only on a cache miss)."""

    def plan_note(self) -> str | None:
        """A remark for `plan` (e.g. why this machine cannot build the stage)."""
        return None

    @abstractmethod
    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        """Write the artifact into `out`; return metadata stored with the entry."""

    @abstractmethod
    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        """Check the artifact in `out` before it is cached."""

    def describe(self, entry: Entry) -> str:
        """Main file of the artifact, for reports."""
        return str(entry.path)
