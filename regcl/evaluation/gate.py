"""Guarded activation: may a candidate merged version replace the live one?

The RegCL promise made into a rule. A candidate (live + one domain's new adapter, merged) goes
live only if

- on the held-out set of the domain it was trained for it **beats** the live version
  (strictly higher IoU), and
- on the held-out set of **every other** domain it loses at most ``tolerance`` IoU.

Otherwise it stays a stored version that is not activated, and :class:`GateReport` says which
check failed with the numbers. Pure arithmetic over scores (no model here): the worker
measures, this decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from regcl.errors import ConfigError

__all__ = ["GateCheck", "GateReport", "guarded_activation"]

DEFAULT_TOLERANCE = 0.02


@dataclass(frozen=True)
class GateCheck:
    """One check: ``improves`` (the candidate's own domain) or ``keeps`` (another domain).
    live / candidate: mean IoU of each on that domain's held-out set; samples: its size."""

    check: Literal["improves", "keeps"]
    domain: str
    live: float
    candidate: float
    samples: int
    passed: bool
    tolerance: float | None = None

    @property
    def change(self) -> float:
        """candidate - live (negative: the candidate is worse)."""
        return self.candidate - self.live

    def describe(self) -> str:
        if self.check == "improves":
            verdict = "beats" if self.passed else "does not beat"
            return (f"on its own domain {self.domain!r} the candidate {verdict} live: IoU "
                    f"{self.candidate:.4f} vs {self.live:.4f} ({self.samples} held-out samples)")
        verdict = "keeps" if self.passed else "forgets"
        return (f"the candidate {verdict} domain {self.domain!r}: IoU {self.candidate:.4f} vs "
                f"live {self.live:.4f}, change {self.change:+.4f} (tolerance -"
                f"{self.tolerance:.4f}; {self.samples} held-out samples)")


@dataclass(frozen=True)
class GateReport:
    """The decision: ``passed`` and every check made, with a sentence for people."""

    passed: bool
    tolerance: float
    checks: tuple[GateCheck, ...]
    reason: str

    @property
    def failed(self) -> tuple[GateCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the job result's ``gate``."""
        return {"passed": self.passed, "tolerance": self.tolerance, "reason": self.reason,
                "failed": [c.check + ":" + c.domain for c in self.failed],
                "checks": [{**asdict(c), "change": c.change} for c in self.checks]}


def guarded_activation(domain: str, own: tuple[float, float, int],
                       others: Mapping[str, tuple[float, float, int]],
                       tolerance: float = DEFAULT_TOLERANCE) -> GateReport:
    """Decide on a candidate for ``domain``.

    Args:
        own: (live IoU, candidate IoU, samples) on ``domain``'s held-out set.
        others: domain → (live IoU, candidate IoU, samples) for every other domain.
        tolerance: largest IoU drop allowed on another domain (>= 0).
    """
    if not 0 <= tolerance <= 1:
        raise ConfigError(f"tolerance must be in [0, 1], got {tolerance}")
    live, cand, n = own
    checks = [GateCheck("improves", domain, float(live), float(cand), int(n), cand > live)]
    for name, (live, cand, n) in sorted(others.items()):
        checks.append(GateCheck("keeps", name, float(live), float(cand), int(n),
                                live - cand <= tolerance + 1e-12, tolerance))
    failed = [c for c in checks if not c.passed]
    if failed:
        reason = "not activated: " + "; ".join(c.describe() for c in failed)
    else:
        reason = "activated: " + "; ".join(c.describe() for c in checks)
    return GateReport(not failed, tolerance, tuple(checks), reason)
