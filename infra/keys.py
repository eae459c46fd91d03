"""Every Redis key and pub/sub channel name regcl uses, in one place, all under ``regcl:``.

Layout (types in brackets)::

    regcl:job:<id>                 [hash]    one job record (see infra.jobs)
    regcl:jobs                     [zset]    job ids scored by creation time (newest = highest)
    regcl:jobs:kind:<kind>         [zset]    the same, per job kind
    regcl:jobs:active              [set]     ids of queued and running jobs (what the reaper scans)
    regcl:job:<id>:lease           [string]  token of the worker running the job; expires unless
                                             that worker renews it (a dead worker's job is reaped)
    regcl:lock:reaper              [string]  held by the worker that reaps stale jobs this round
    regcl:adapters                 [hash]    adapter name -> AdapterRecord JSON
    regcl:adapters:revision        [string]  INCR counter, bumped after each adapter add/delete
    regcl:versions                 [hash]    version number -> VersionRecord JSON
    regcl:versions:counter         [string]  INCR counter; a number is never handed out twice
    regcl:live                     [string]  number of the live (served) version
    regcl:lock:merge               [string]  redis-py Lock serialising merges
    regcl:lock:adapter:<name>      [string]  redis-py Lock held while an adapter is uploaded
    regcl:datasets                 [hash]    dataset name -> DatasetRecord JSON (infra.datasets)
    regcl:lock:dataset:<name>      [string]  redis-py Lock held while a dataset is added/deleted
    regcl:ls:projects              [hash]    Label Studio project id -> {"domain", "step"} JSON
    regcl:ls:serving               [hash]    domain -> what serves its projects (ServingRecord
                                             JSON, infra.project_serving)
    regcl:ls:preencode:<project>   [hash]    a project's pre-encode: its job, adapter, version
    regcl:ls:preencode:<project>:images [hash] image key (URL) -> {"image", "width", "height"}
                                             of the tasks pre-encoded (the first click's
                                             image without a fetch)
    regcl:ls:preencode:projects    [set]     projects pre-encoded (re-run after a live swap)
    regcl:ls:ingest                [stream]  annotation events recorded, not yet stored
                                             (service.labelstudio.ingest_queue)
    regcl:ls:ingest:attempts       [hash]    stream entry id -> tries that raised a bug
    regcl:ls:ingest:failed         [list]    the latest events that could not be stored (JSON)
    regcl:lock:ls-ingest           [string]  redis-py Lock: the one turn to store events
    regcl:samples:domains          [set]     domains that have a sample set (infra.sample_sets)
    regcl:samples:<domain>:log     [list]    the domain's append-only annotation log (JSON entries)
    regcl:samples:<domain>:seen    [string]  log length at the latest snapshot
    regcl:samples:<domain>:seq     [string]  INCR counter of the domain's snapshots
    regcl:samples:<domain>:job     [string]  id of the domain's latest continual-step job
    regcl:lock:samples:<domain>    [string]  redis-py Lock held while a step is submitted
    regcl:events:job:<id>          [channel] JSON events of one job (progress, state)
    regcl:events:jobs              [channel] the same events for every job
    regcl:events:live              [channel] {"version": n} each time the live pointer moves
    regcl:events:adapters          [channel] {"revision": n, "name": ...} after each adapter
                                             add/delete (the API's domain routers follow it)
    regcl:celery:*                 Celery broker/result keys, if the Celery app passes
                                   CELERY_KEY_PREFIX as ``global_keyprefix`` (see below)
"""

from __future__ import annotations

PREFIX = "regcl:"

JOBS = f"{PREFIX}jobs"
ADAPTERS = f"{PREFIX}adapters"
ADAPTERS_REVISION = f"{PREFIX}adapters:revision"
VERSIONS = f"{PREFIX}versions"
VERSION_COUNTER = f"{PREFIX}versions:counter"
LIVE = f"{PREFIX}live"
MERGE_LOCK = f"{PREFIX}lock:merge"
REAPER_LOCK = f"{PREFIX}lock:reaper"
STAGING_SWEEP_LOCK = f"{PREFIX}lock:staging-sweep"
ACTIVE_JOBS = f"{PREFIX}jobs:active"
DATASETS = f"{PREFIX}datasets"
LS_PROJECTS = f"{PREFIX}ls:projects"
LS_SERVING = f"{PREFIX}ls:serving"
"""Per domain: what serves its Label Studio projects (:mod:`infra.project_serving`)."""
LS_PREENCODE_PROJECTS = f"{PREFIX}ls:preencode:projects"
LS_INGEST = f"{PREFIX}ls:ingest"
LS_INGEST_ATTEMPTS = f"{PREFIX}ls:ingest:attempts"
LS_INGEST_FAILED = f"{PREFIX}ls:ingest:failed"
LS_INGEST_LOCK = f"{PREFIX}lock:ls-ingest"
SAMPLE_DOMAINS = f"{PREFIX}samples:domains"

JOB_EVENTS_CHANNEL = f"{PREFIX}events:jobs"
LIVE_CHANNEL = f"{PREFIX}events:live"
ADAPTERS_CHANNEL = f"{PREFIX}events:adapters"

# For the Celery app: broker_transport_options={"global_keyprefix": CELERY_KEY_PREFIX} (and the
# same in result_backend_transport_options) keeps kombu's keys inside regcl's namespace too.
CELERY_KEY_PREFIX = f"{PREFIX}celery:"


def job(job_id: str) -> str:
    """Hash holding one job record."""
    return f"{PREFIX}job:{job_id}"


def job_lease(job_id: str) -> str:
    """Lease of the worker running the job (its token, with a TTL that worker keeps renewing)."""
    return f"{PREFIX}job:{job_id}:lease"


def jobs_by_kind(kind: str) -> str:
    """Sorted set of the job ids of one kind, scored by creation time."""
    return f"{JOBS}:kind:{kind}"


def job_gate(job_id: str) -> str:
    """The gate decision of a continual-step job, written once (a rerun reads it back)."""
    return f"{PREFIX}job:{job_id}:gate"


def job_channel(job_id: str) -> str:
    """Pub/sub channel carrying the events of one job."""
    return f"{PREFIX}events:job:{job_id}"


def adapter_lock(name: str) -> str:
    """Lock held while adapter ``name`` is uploaded, so two uploads of one name cannot race."""
    return f"{PREFIX}lock:adapter:{name}"


def dataset_lock(name: str) -> str:
    """Lock held while dataset ``name`` is added or deleted, so two uploads cannot race."""
    return f"{PREFIX}lock:dataset:{name}"


def samples(domain: str, part: str) -> str:
    """One of a domain's sample-set keys: ``log``, ``versions``, ``seen``, ``seq``, ``steps``
    (snapshot number and log length reserved per step job) or ``job``."""
    return f"{PREFIX}samples:{domain}:{part}"


def ls_sync(project: int) -> str:
    """A Label Studio project's sync: its active job and its cursor (the last task done)."""
    return f"{PREFIX}ls:sync:{int(project)}"


def ls_preencode(project: int) -> str:
    """A Label Studio project's pre-encode: its active job, adapter and adapter version."""
    return f"{PREFIX}ls:preencode:{int(project)}"


def ls_preencode_images(project: int) -> str:
    """A pre-encoded project's task images by URL (id and size)."""
    return f"{PREFIX}ls:preencode:{int(project)}:images"


def samples_lock(domain: str) -> str:
    """Lock held while a continual step of ``domain`` is submitted (one at a time)."""
    return f"{PREFIX}lock:samples:{domain}"
