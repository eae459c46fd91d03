"""Background workers of the regcl service: Celery tasks that train, merge, evaluate and compute
statistics for LoRA domain adapters.

Modules (nothing is loaded or connected at import time; only the worker-side modules import
torch):

- :mod:`workers.celery_app`: ``make_celery(settings)``, task names, queues, the job/retry policy,
  and the lazily built ``app`` that ``celery -A workers.celery_app worker`` runs;
- :mod:`workers.submit`: the job-submission surface for the API (no torch): ``submit_train``,
  ``submit_merge``, ``submit_evaluate``, ``submit_stats``, ``cancel_job``;
- :mod:`workers.params`: validated parameters of each job kind (pydantic, no torch);
- :mod:`workers.tasks`: the Celery tasks (worker side; thin adapters over ``regcl``);
- :mod:`workers.protocol`: the job protocol every task follows (start, progress, cancellation,
  failure, attempt cap);
- :mod:`workers.steps`: the building blocks of the tasks (registry lookups with base-model
  checks, dataset tensors, storing adapters and versions);
- :mod:`workers.runtime`: per-process state of a worker (settings, clients, the base model);
- :mod:`workers.prepare`: datasets → model-sized tensors (ResizeLongestSide + padding).

``regcl up`` (Redis + a worker + the API in the foreground) is an entry point: :mod:`cli.up`.
"""
