"""The guarded-activation rule (pure arithmetic): beat live on the own domain, lose at most the
tolerance on every other domain; the report names each failed check with its numbers."""

from __future__ import annotations

import pytest

from regcl.errors import ConfigError
from regcl.evaluation.gate import guarded_activation


def test_passes_when_better_and_nothing_forgotten() -> None:
    report = guarded_activation("ls-1", (0.50, 0.61, 4), {"polyp": (0.70, 0.69, 8)}, 0.02)
    assert report.passed and not report.failed
    assert report.reason.startswith("activated: ")
    assert [c.check for c in report.checks] == ["improves", "keeps"]


def test_not_better_on_the_own_domain() -> None:
    report = guarded_activation("ls-1", (0.50, 0.50, 4), {}, 0.02)
    assert not report.passed
    assert [c.domain for c in report.failed] == ["ls-1"]
    assert "does not beat live: IoU 0.5000 vs 0.5000" in report.reason


def test_forgetting_beyond_the_tolerance() -> None:
    report = guarded_activation("ls-2", (0.40, 0.80, 4),
                                {"ls-1": (0.70, 0.60, 5), "camo": (0.50, 0.49, 3)}, 0.02)
    assert not report.passed
    assert [c.domain for c in report.failed] == ["ls-1"]
    body = report.to_dict()
    assert body["failed"] == ["keeps:ls-1"]
    forgot = next(c for c in body["checks"] if c["domain"] == "ls-1")
    assert forgot["live"] == 0.70 and forgot["candidate"] == 0.60
    assert forgot["change"] == pytest.approx(-0.10) and forgot["tolerance"] == 0.02
    assert "forgets domain 'ls-1': IoU 0.6000 vs live 0.7000, change -0.1000" in body["reason"]


def test_a_drop_of_exactly_the_tolerance_is_allowed() -> None:
    assert guarded_activation("a", (0.1, 0.2, 1), {"b": (0.52, 0.50, 1)}, 0.02).passed
    assert not guarded_activation("a", (0.1, 0.2, 1), {"b": (0.53, 0.50, 1)}, 0.02).passed


def test_tolerance_must_be_a_fraction() -> None:
    with pytest.raises(ConfigError):
        guarded_activation("a", (0.1, 0.2, 1), {}, -0.01)
