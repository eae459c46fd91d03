"""What serves each Label Studio project: its own domain adapter, once a step has earned it.

A project's predictions come from, in order (the backend resolves it per request):

1. **its domain's own adapter** (``<domain>-s<n>``, unmerged), when the continual step that
   trained it found it at least as good as live on the domain's held-out set (mean IoU not
   below the live version's the step left behind; see :attr:`ServingCheck.passed` for ties);
2. else ``auto`` (the router chooses a domain adapter or falls back to live);
3. else ``live``.

The worker writes one :class:`ServingCheck` per continual step (:meth:`ProjectServing.record`);
a check that passes makes that adapter the domain's, a check that fails changes nothing but
``last_check`` — **a rejected step leaves the project on what served it before**. The record
(JSON per domain in ``keys.LS_SERVING``) keeps the check that put the adapter there, the last
check and the last :data:`HISTORY` changes with their times, so what serves a project, why and
since when is one read away.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from infra import keys

__all__ = ["HISTORY", "ProjectServing", "ServingCheck", "ServingRecord"]

HISTORY = 20
"""Changes of a domain's serving adapter kept in its record (newest last)."""


@dataclass(frozen=True)
class ServingCheck:
    """A continual step's comparison of the domain's new adapter with live.

    adapter / sha256: the step's adapter and its registry digest. adapter_iou / live_iou: mean
    IoU of the adapter alone and of the live version the step left (``live``: its label,
    ``base`` when nothing is live) on the domain's held-out set of ``samples`` samples.
    """

    adapter: str
    sha256: str
    adapter_iou: float
    live: str
    live_iou: float
    samples: int
    job_id: str | None = None
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @property
    def passed(self) -> bool:
        """The adapter is at least as good as live. A tie passes: with one domain in live the
        merge *is* that adapter, and a project left on auto then moves with every later merge
        (``regcl bench campaign`` measured its first project lose up to +10 % NoC@85 that
        way while the projects on their own adapters lost nothing)."""
        return self.samples > 0 and self.adapter_iou >= self.live_iou

    def describe(self) -> str:
        verdict = ("beats" if self.adapter_iou > self.live_iou else "matches") if self.passed \
            else "does not beat"
        return (f"adapter {self.adapter!r} {verdict} {self.live}: IoU {self.adapter_iou:.4f} "
                f"vs {self.live_iou:.4f} on {self.samples} held-out samples")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "reason": self.describe()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingCheck:
        return cls(**{k: data[k] for k in ("adapter", "sha256", "adapter_iou", "live",
                                           "live_iou", "samples", "job_id", "at")})


@dataclass(frozen=True)
class ServingRecord:
    """A domain's serving state. ``adapter`` None: no step has earned it an adapter (the
    project is served by auto, else live). ``check``: the check that made ``adapter`` the
    domain's; ``last_check``: the latest step's, passed or not."""

    domain: str
    adapter: str | None = None
    sha256: str | None = None
    since: str | None = None
    check: ServingCheck | None = None
    last_check: ServingCheck | None = None
    history: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "adapter": self.adapter, "sha256": self.sha256,
                "since": self.since,
                "check": None if self.check is None else self.check.to_dict(),
                "last_check": None if self.last_check is None else self.last_check.to_dict(),
                "history": list(self.history)}

    @classmethod
    def from_json(cls, domain: str, raw: str | bytes | None) -> ServingRecord:
        if raw is None:
            return cls(domain)
        data = json.loads(raw)
        checks = {k: None if data.get(k) is None else ServingCheck.from_dict(data[k])
                  for k in ("check", "last_check")}
        return cls(domain, data.get("adapter"), data.get("sha256"), data.get("since"),
                   checks["check"], checks["last_check"], tuple(data.get("history", ())))


class ProjectServing:
    """The serving records of every domain, in Redis (see the module doc)."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def get(self, domain: str) -> ServingRecord:
        return ServingRecord.from_json(domain, self._redis.hget(keys.LS_SERVING, domain))

    def all(self) -> dict[str, ServingRecord]:
        return {_text(d): ServingRecord.from_json(_text(d), raw)
                for d, raw in self._redis.hgetall(keys.LS_SERVING).items()}

    def record(self, domain: str, check: ServingCheck) -> ServingRecord:
        """Store a step's check: if it passed, its adapter serves the domain from now; else
        only ``last_check`` changes. Returns the record as stored. A check of the job whose
        check is the domain's latest was stored already (by an attempt of that job its worker
        died in): nothing is written, the record is returned as it is."""
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(keys.LS_SERVING)
                    old = ServingRecord.from_json(domain, pipe.hget(keys.LS_SERVING, domain))
                    if _recorded(old, check):
                        pipe.unwatch()
                        return old
                    new = _apply(old, check)
                    pipe.multi()
                    pipe.hset(keys.LS_SERVING, domain, json.dumps(new.to_dict(),
                                                                  allow_nan=False))
                    pipe.execute()
                    return new
                except redis.WatchError:  # another domain's step wrote meanwhile: again
                    continue

    def forget(self, domain: str) -> bool:
        """Drop a domain's record (its projects go back to auto / live)."""
        return bool(self._redis.hdel(keys.LS_SERVING, domain))


def _recorded(old: ServingRecord, check: ServingCheck) -> bool:
    return (check.job_id is not None and old.last_check is not None
            and old.last_check.job_id == check.job_id)


def _apply(old: ServingRecord, check: ServingCheck) -> ServingRecord:
    if not check.passed:
        return ServingRecord(old.domain, old.adapter, old.sha256, old.since, old.check, check,
                             old.history)
    change = {"adapter": check.adapter, "sha256": check.sha256, "since": check.at,
              "job_id": check.job_id, "adapter_iou": check.adapter_iou,
              "live": check.live, "live_iou": check.live_iou}
    return ServingRecord(old.domain, check.adapter, check.sha256, check.at, check, check,
                         (*old.history, change)[-HISTORY:])


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
