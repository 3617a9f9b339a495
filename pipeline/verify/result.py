"""What a stage's verification found: metrics, missed thresholds, notes, and what was not checked.

`not_checked` names every check that did not run or every step that was skipped instead of
done (a simplifier that cannot hold the model, a schema check without its library, a fusion
that found nothing to fuse), each with the reason: the report and the terminal summary count
them, so nothing is downgraded silently. `thresholds` holds the effective value of each
threshold and where it came from (pipeline/verify/policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class NotChecked:
    what: str
    why: str

    def to_dict(self) -> dict[str, str]:
        return {"what": self.what, "why": self.why}


@dataclass
class Verification:
    passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    not_checked: list[NotChecked] = field(default_factory=list)
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)

    def skip(self, what: str, why: str) -> None:
        self.not_checked.append(NotChecked(what, why))

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "metrics": self.metrics, "failures": self.failures, "notes": self.notes,
                "not_checked": [n.to_dict() for n in self.not_checked], "thresholds": self.thresholds}
