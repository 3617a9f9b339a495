"""The stage contract: a typed config in, a folder of files out, a verification record.

A stage never writes into the cache itself: the pipeline hands it a fresh temporary folder,
and commits that folder only if the stage returned and its verification passed.

Each stage class names its recipe section's config (`Config`, defined beside it) and says what
its key depends on: its config, the versions of the tools that shape its output, for
target-specific stages the target, and what decides its verdict (`verification_key`: its
effective thresholds and the verification settings, never another stage's).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..cache import Entry
from ..hashing import chain_key
from ..memory import RUNTIME_OVERHEAD_BYTES
from ..target import package_version
from ..verify.policy import Policy
from ..verify.result import Verification

if TYPE_CHECKING:
    from ..context import RunContext

__all__ = ["Stage", "Verification"]


class Stage(ABC):
    name: ClassVar[str]
    Config: ClassVar[type]  # the pydantic model of this stage's recipe section
    version: ClassVar[int] = 1
    target_specific: ClassVar[bool] = False
    # distributions whose versions change what the stage produces: part of the key
    tools: ClassVar[tuple[str, ...]] = ()
    # whether the stage's verification has thresholds and settings that decide its verdict: part of the key
    verified: ClassVar[bool] = True
    # peak memory while building and verifying, as a multiple of the weights it works on (pipeline/memory.py):
    # the model's in float32 ("fp32") or the ONNX graph's it reads ("graph", smaller once a precision lowered it)
    memory_factor: ClassVar[float] = 3.0
    memory_basis: ClassVar[str] = "fp32"
    memory_overhead: ClassVar[int] = RUNTIME_OVERHEAD_BYTES  # its process's libraries (PyTorch imported)
    # verifies against PyTorch's reference outputs (the first such stage built in a run computes them)
    reads_reference: ClassVar[bool] = False
    # its artifact becomes the model later stages are checked against (quantize)
    changes_reference: ClassVar[bool] = False
    # bytes its artifact takes on disk, as a multiple of the weights it writes: the model's in float32, or the
    # graph's as this stage leaves them (pipeline/memory.py: MemoryPlan.disk); 0 for one that writes no weights
    disk_factor: ClassVar[float] = 0.0

    def __init__(self, spec: Any, ctx: RunContext):
        self.spec = spec
        self.ctx = ctx

    def memory_multiple(self) -> float:
        """This stage's multiple of its weights for the estimate (a stage whose work depends on its settings
        overrides it)."""
        return self.memory_factor

    def thresholds(self) -> Policy | None:
        """The thresholds this stage is held to, each with its source (pipeline/verify/policy.py)."""
        if not self.verified:
            return None
        return self.ctx.recipe.recipe.policy_for(self.name)

    @property
    def policy(self) -> Policy:
        policy = self.thresholds()
        if policy is None:
            raise TypeError(f"stage {self.name} has no verification thresholds")
        return policy

    def verification_key(self) -> dict[str, Any] | None:
        """What decides this stage's verdict, for the key: its effective thresholds and the settings the
        reference outputs and timings are made with."""
        if not self.verified:
            return None
        return {"thresholds": self.policy.values(), "settings": self.ctx.verify_spec.settings()}

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
        verification = self.verification_key()
        if verification is not None:
            material["verify"] = verification
        calibration = getattr(self.spec, "calibration", None)
        if calibration is not None:  # the text's content, not its name, decides what calibration sees
            from ..calibration import text_identity

            where = f"{self.ctx.recipe.path}: stages.{self.name}.calibration"
            material["calibration_text"] = text_identity(calibration.text, self.ctx.recipe.path.parent, where=where)
        return material

    def key(self, parent_key: str | None) -> str:
        return chain_key(self.key_material(parent_key))

    def preflight(self) -> None:  # noqa: B027 (a hook: most stages can build anywhere)
        """Raise ResourceError if this machine cannot build the stage (called only on a cache miss)."""

    def plan_note(self) -> str | None:
        """A remark for `plan` (e.g. why this machine cannot build the stage)."""
        return None

    @abstractmethod
    def build(self, parent: Entry | None, out: Path) -> dict[str, Any]:
        """Write the artifact into `out`; return metadata stored with the entry (with an `artifact` record,
        pipeline/artifacts.py)."""

    @abstractmethod
    def verify(self, parent: Entry | None, out: Path, meta: dict[str, Any]) -> Verification:
        """Check the artifact in `out` before it is cached."""

    def describe(self, entry: Entry) -> str:
        """Main file of the artifact, for reports."""
        return str(entry.path)
