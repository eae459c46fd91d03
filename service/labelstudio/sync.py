"""Syncing a project's existing annotations (those made before regcl was connected, imported
with the tasks, or created while it was away) into its domain's sample set: the job
``labelstudio-sync``.

The job pages through the project's annotated tasks with Label Studio's API, in task id order,
``/api/tasks?project=<id>&fields=all&query={filters: total_annotations > 0 and id > cursor,
ordering: id}``, and stores each annotation as its ``ANNOTATION_CREATED`` webhook would
(:meth:`AnnotationStore.store_annotation`). It is

- **idempotent**: an annotation whose id and update time (``updated_at``) the sample set holds
  already is not fetched or stored again, so the same annotation is stored once however often
  the sync runs (and whether its webhook came first);
- **resumable**: after each task the cursor (the last task id done) is kept in Redis
  (``keys.ls_sync(project)``); a sync that stopped (Label Studio away, its token refused, the
  API process stopped, cancelled) leaves it, and the next sync of the project goes on from
  there; a sync that finishes clears it;
- **a job like the others**: a :class:`infra.jobs.JobStore` record (``GET /v1/jobs/{id}``, its
  events at ``GET /v1/jobs/{id}/events``, ``POST /v1/jobs/{id}/cancel``) with progress
  (tasks done of the total), its lease renewed while it runs. It runs on a thread of the API
  process, not on a worker: it speaks Label Studio's protocol (tokens, storage hosts, region
  formats), which lives in the service. One sync per project at a time.

An annotation regcl cannot read (a malformed region, an image Label Studio cannot give) is
counted and named in the result (``failed``), and the sync goes on; a refused token or an
unreachable Label Studio stops it (resumable).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from infra import keys
from infra.errors import InsufficientStorage, StoreUnavailable
from infra.jobs import JobRecord, JobStore
from infra.sample_sets import SampleSets
from infra.settings import Settings
from regcl.errors import RegclError
from service.labelstudio.api_jobs import ApiThreadJobs, count_failure
from service.labelstudio.connection import LabelStudioConnection
from service.labelstudio.errors import (
    LabelStudioNotConfiguredError,
    LabelStudioTokenRefusedError,
    LabelStudioUnreachableError,
)
from service.labelstudio.label_config import LabelConfig, parse_label_config

__all__ = ["PAGE_SIZE", "STOPPING", "SYNC_KIND", "AnnotationStore", "ProjectSync", "StoreOutcome"]

logger = logging.getLogger(__name__)

SYNC_KIND = "labelstudio-sync"
PAGE_SIZE = 50
STOPPING = (LabelStudioTokenRefusedError, LabelStudioUnreachableError,
            LabelStudioNotConfiguredError, redis.exceptions.ConnectionError,
            InsufficientStorage, StoreUnavailable)
"""Errors after which every other annotation would fail too: they stop a sync (and a bulk
webhook) instead of being counted against one annotation, and keep a queued webhook event
queued (:mod:`.ingest_queue`)."""


@dataclass(frozen=True)
class StoreOutcome:
    """What storing one annotation did: ``stored`` (masks written), ``unchanged`` (that
    version was stored already) or ``empty`` (no mask: nothing stored, an older version
    removed); ``samples``: its masks."""

    outcome: str
    samples: int = 0


class AnnotationStore(Protocol):
    """What the sync stores annotations with (:class:`service.labelstudio.backend.
    LabelStudioBackend` is one)."""

    def store_annotation(self, project_id: int, domain: str, config: LabelConfig,
                         annotation: object, task: object) -> StoreOutcome: ...


def _query(cursor: int) -> str:
    items = [{"filter": "filter:tasks:total_annotations", "operator": "greater",
              "type": "Number", "value": 0}]
    if cursor:
        items.append({"filter": "filter:tasks:id", "operator": "greater", "type": "Number",
                      "value": cursor})
    return json.dumps({"filters": {"conjunction": "and", "items": items},
                       "ordering": ["tasks:id"]})


class ProjectSync(ApiThreadJobs):
    """Starts and runs sync jobs (see the module doc) on ``threads`` threads."""

    what = "sync"
    lost = "the API process that ran this sync stopped; the next sync goes on from where it "\
        "stopped"
    never_started = "this sync was never started (its API process stopped); a new sync "\
        "replaces it"
    after_failure = "the next sync resumes"

    def __init__(self, settings: Settings, connection: LabelStudioConnection, jobs: JobStore,
                 client: redis.Redis, samples: SampleSets, store: AnnotationStore,
                 threads: int = 2) -> None:
        super().__init__(settings, jobs, client, threads, "ls-sync")
        self.connection = connection
        self.samples = samples
        self.store = store

    # -- starting ------------------------------------------------------------------------------

    def start(self, project_id: int) -> tuple[JobRecord, bool]:
        """The project's sync job: a new one, or (second value True) the one still active."""
        self.connection.require_origin()
        key = keys.ls_sync(project_id)
        with self._start_lock, self.redis.lock(f"{key}:lock", timeout=30, blocking_timeout=10,
                                               thread_local=False):
            running = self._active(key)
            if running is not None:
                return running, True
            job_id = self.jobs.create(SYNC_KIND, {"project": project_id})
            self.redis.hset(key, "job", job_id)
            self._mine.add(job_id)
        self._submit(job_id, project_id, lambda job: self._sync(job, project_id))
        logger.info("project %d: sync submitted as job %s", project_id, job_id)
        return self.jobs.get(job_id), False

    # -- running -------------------------------------------------------------------------------

    def _sync(self, job_id: str, project_id: int) -> dict[str, Any]:
        key = keys.ls_sync(project_id)
        project = self.connection.get_json(f"/api/projects/{project_id}")
        config = parse_label_config(project.get("label_config") if isinstance(project, dict)
                                    else None)
        domain = self.samples.project(project_id).domain
        raw = self.redis.hget(key, "cursor")
        cursor = int(raw) if raw is not None else 0
        counts = {"tasks": 0, "annotations": 0, "stored": 0, "unchanged": 0, "empty": 0,
                  "failed": 0}
        failures: list[dict[str, Any]] = []
        total: int | None = None
        resumed_from = cursor
        while True:
            self._check_stop(job_id)
            page = self.connection.get_json("/api/tasks", {
                "project": project_id, "page": 1, "page_size": PAGE_SIZE, "fields": "all",
                "resolve_uri": "false", "query": _query(cursor)})
            tasks = page.get("tasks") if isinstance(page, dict) else None
            if not isinstance(tasks, list):
                raise LabelStudioUnreachableError("Label Studio's task list has no 'tasks'")
            if total is None:
                remaining = page.get("total")
                total = counts["tasks"] + (remaining if isinstance(remaining, int) else
                                           len(tasks))
            for task in tasks:
                self._check_stop(job_id)
                task_id = task.get("id") if isinstance(task, dict) else None
                if not isinstance(task_id, int) or task_id <= cursor:
                    raise LabelStudioUnreachableError("Label Studio's task list is not in task "
                                                      "id order")
                for annotation in task.get("annotations") or []:
                    if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
                        continue
                    counts["annotations"] += 1
                    try:
                        outcome = self.store.store_annotation(project_id, domain, config,
                                                              annotation, task)
                    except STOPPING:
                        raise
                    except RegclError as exc:
                        count_failure(counts, failures, exc, task=task_id,
                                      annotation=annotation.get("id"))
                        continue
                    counts[outcome.outcome] += 1
                cursor = task_id
                self.redis.hset(key, "cursor", cursor)
                counts["tasks"] += 1
                self.jobs.update_progress(job_id, min(counts["tasks"] / max(total, 1), 1.0),
                                          {**counts, "total": total})
            if len(tasks) < PAGE_SIZE:
                break
        self.redis.hdel(key, "cursor")
        return {"project": project_id, "domain": domain, **counts, "total": total,
                "resumed_from_task": resumed_from or None, "failures": failures,
                "pending": self.samples.pending(domain)}
