"""What answers a Label Studio project's predictions, and how that is reported.

Per project, in order (:mod:`infra.project_serving` keeps the decisions, the continual step
makes them): its own domain adapter once a step found it at least as good as live on the
project's held-out set; else ``auto`` (the router, which falls back to live); else ``live``. With
``label_studio_serving = "live"`` every project gets the live merge. Versions are reported as
``domain:<name>@<sha8>`` (the adapter's content digest), ``live:<n>`` or ``base``.
"""

from __future__ import annotations

from dataclasses import dataclass

from infra.project_serving import ProjectServing, ServingRecord
from infra.sample_sets import SampleSets
from infra.settings import Settings
from service.engine import AUTO, LIVE, SegmentationEngine
from service.labelstudio.schemas import ProjectServingResponse

__all__ = ["Serving", "ServingChoice"]


@dataclass(frozen=True)
class Serving:
    """What answers a project's predictions now: ``adapter`` is what the engine is asked for
    (a domain adapter's name, ``auto`` or ``live``); ``reason`` says why, for people."""

    project: int | None
    domain: str | None
    adapter: str
    reason: str
    record: ServingRecord | None = None

    @property
    def kind(self) -> str:
        """``domain``, ``auto`` or ``live``."""
        return self.adapter if self.adapter in (AUTO, LIVE) else "domain"


class ServingChoice:
    """Resolves and describes what serves each project (see the module doc)."""

    def __init__(self, settings: Settings, engine: SegmentationEngine, samples: SampleSets,
                 records: ProjectServing) -> None:
        self.settings = settings
        self.engine = engine
        self.samples = samples
        self.records = records

    def for_project(self, project_id: int | None) -> Serving:
        """What answers ``project_id``'s predictions; a request without a project is served
        as a project without its own adapter."""
        if self.settings.label_studio_serving == "live":
            return Serving(project_id, None, LIVE, "label_studio_serving is 'live': the live "
                           "merge serves every project")
        if project_id is None:
            return Serving(None, None, AUTO, "auto (the request names no project)")
        domain = self.samples.project(project_id).domain
        record = self.records.get(domain)
        if record.adapter is not None and record.check is not None:
            return Serving(project_id, domain, record.adapter,
                           f"its own adapter since {record.since}: {record.check.describe()}",
                           record)
        why = ("no continual step of its domain yet" if record.last_check is None else
               f"its last step's {record.last_check.describe()}")
        return Serving(project_id, domain, AUTO, f"auto ({why})", record)

    def model_version(self, serving: Serving) -> str:
        """What the project's predictions report, when known before the image: its adapter's
        ``domain:<name>@<sha8>``, ``live:<n>`` / ``base``, or ``auto`` while a router exists
        (each prediction then names what was chosen)."""
        record = serving.record
        if serving.kind == "domain" and record is not None and record.sha256:
            return f"domain:{serving.adapter}@{record.sha256[:8]}"
        if serving.adapter == AUTO and self.engine.routing.state.block is not None:
            return AUTO
        return self.engine.adapters.live_label

    def version_label(self, label: str) -> str:
        """A result's adapter label, with ``@<sha8>`` of its content for a domain adapter."""
        if not label.startswith("domain:"):
            return label
        revision = self.engine.adapters.revision_of(label.removeprefix("domain:"))
        return label if revision is None else f"{label}@{revision[:8]}"

    def known_projects(self) -> list[int]:
        """Projects configured at setup, and those of default domains (``ls-<id>``) with a
        sample set or a serving record."""
        found = set(self.samples.configured_projects())
        for domain in {*self.samples.domains(), *self.records.all()}:
            head, _, tail = domain.partition("-")
            if head == "ls" and tail.isdigit() and len(tail) < 19:
                found.add(int(tail))
        return sorted(found)

    def describe(self, project_id: int) -> ProjectServingResponse:
        """``GET /labelstudio/projects/{project}``: what serves it, why, since when."""
        serving = self.for_project(project_id)
        domain = serving.domain or self.samples.project(project_id).domain
        record = serving.record or self.records.get(domain)
        data = record.to_dict()
        return ProjectServingResponse(
            project=project_id, domain=domain, serves=serving.kind, adapter=serving.adapter,
            model_version=self.model_version(serving), reason=serving.reason,
            since=record.since if serving.kind == "domain" else None, check=data["check"],
            last_check=data["last_check"], history=data["history"])
