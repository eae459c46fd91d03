"""The submission surface: validation before anything is recorded, what a job records, and
that the parameter models agree with the library (no worker needed: nothing consumes db 0)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import redis

from infra.jobs import JobState, JobStore
from infra.settings import Settings
from regcl.adapters import AdapterConfig
from regcl.errors import ConfigError
from regcl.merging import STREAMING_METHODS, make_params
from regcl.merging.catalogue import CATALOGUE, Choice, parameter_bounds
from regcl.training.adapter import TrainConfig
from workers import params as job_params
from workers.celery_app import ALL_QUEUES, QUEUE_OF, make_celery
from workers.submit import (
    cancel_job,
    submit_evaluate,
    submit_merge,
    submit_stats,
    submit_train,
)


@pytest.fixture
def api(redis_client: redis.Redis, redis_server):
    settings = Settings(redis_url=redis_server.url)
    app = make_celery(settings)
    yield app, JobStore(redis_client)
    app.close()


@pytest.mark.parametrize("call, match", [
    (lambda c, j: submit_train(c, j, dataset="polyp", domain="polyp", params={"epochs": 0}),
     "epochs"),
    (lambda c, j: submit_train(c, j, dataset="polyp", domain="polyp", params={"lr": -1}), "lr"),
    (lambda c, j: submit_train(c, j, dataset="polyp", domain="polyp", params={"rank": 0}),
     "rank"),
    (lambda c, j: submit_train(c, j, dataset="polyp", domain="polyp", params={"epoch": 3}),
     "epoch: Extra inputs"),
    (lambda c, j: submit_train(c, j, dataset="polyp", domain="polyp",
                               params={"blocks": [3, 3]}), "distinct"),
    (lambda c, j: submit_train(c, j, dataset="polyp", domain="polyp",
                               params={"adapter": "Bad Name"}), "adapter"),
    (lambda c, j: submit_train(c, j, dataset="../x", domain="polyp"), "dataset name"),
    (lambda c, j: submit_train(c, j, dataset="polyp", domain="Polyp!"), "domain"),
    (lambda c, j: submit_merge(c, j, adapters=[]), "adapters"),
    (lambda c, j: submit_merge(c, j, adapters=["a", "a"]), "repeat"),
    (lambda c, j: submit_merge(c, j, adapters=["a"], method="ties"), "method"),
    (lambda c, j: submit_merge(c, j, adapters=["a"], params={"ridge": -1}), "ridge"),
    (lambda c, j: submit_merge(c, j, adapters=["a"], params={"ridge": float("nan")}), "ridge"),
    (lambda c, j: submit_merge(c, j, adapters=["a"], method="mean", params={"ridge": 1}),
     "ridge"),
    (lambda c, j: submit_evaluate(c, j, datasets=["polyp"], version=1, adapter="a"), "not both"),
    (lambda c, j: submit_evaluate(c, j, datasets=["polyp"], version=0), "version"),
    (lambda c, j: submit_evaluate(c, j, datasets=[]), "datasets"),
    (lambda c, j: submit_evaluate(c, j, datasets=["polyp"], params={"n_points": 0}),
     "n_points"),
    (lambda c, j: submit_stats(c, j, adapter="a", dataset="polyp", params={"output": "a"}),
     "new name"),
    (lambda c, j: submit_stats(c, j, adapter="a" * 64, dataset="polyp"), "output"),
])
def test_bad_arguments_are_refused_before_anything_is_recorded(api, call, match) -> None:
    celery, jobs = api
    with pytest.raises(ConfigError, match=match):
        call(celery, jobs)
    assert jobs.list() == []


def test_a_job_records_its_full_arguments_and_can_be_cancelled_while_queued(api) -> None:
    celery, jobs = api
    job = submit_train(celery, jobs, dataset="polyp", domain="polyp", params={"epochs": 2})
    assert job.kind == "train" and job.state is JobState.QUEUED
    assert job.params["dataset"] == "polyp" and job.params["domain"] == "polyp"
    assert job.params["params"]["epochs"] == 2 and job.params["params"]["rank"] == 10
    merge = submit_merge(celery, jobs, adapters=["polyp"], activate=True)
    assert merge.params == {"adapters": ["polyp"], "method": job_params.DEFAULT_MERGE_METHOD,
                            "params": {"ridge": 1e-4, "alpha": 1.0, "weighting": "domain"},
                            "activate": True,
                            "fresh": False}
    mean = submit_merge(celery, jobs, adapters=["polyp"], method="mean", params=None)
    assert mean.params["method"] == "mean" and mean.params["params"] == {}
    # min_lr above lr is a schedule that rises: allowed (the document cannot state a
    # comparison between two fields, so the server does not refuse one)
    rising = submit_train(celery, jobs, dataset="polyp", domain="polyp",
                          params={"lr": 1e-3, "min_lr": 1e-2})
    assert rising.params["params"]["min_lr"] == 1e-2
    stats = submit_stats(celery, jobs, adapter="polyp", dataset="polyp")
    assert stats.params["params"]["output"] == "polyp-stats"

    cancelled = cancel_job(celery, jobs, job.id)
    assert cancelled.state is JobState.CANCELLED
    with pytest.raises(RuntimeError):  # Conflict: already finished
        cancel_job(celery, jobs, job.id)
    with pytest.raises(KeyError):  # NotFound
        cancel_job(celery, jobs, "0" * 32)


def test_parameter_models_agree_with_the_library() -> None:
    assert tuple(job_params.METHOD_PARAMS) == STREAMING_METHODS
    for method in STREAMING_METHODS:
        ours = job_params.method_params_type(method)
        assert ours().model_dump() == make_params(method).to_dict(), method
        # the same bounds: a value just past each finite bound is refused by both
        for name, (bound, _, _) in parameter_bounds(CATALOGUE[method].params_type).items():
            if isinstance(bound, Choice):  # a name outside the options is refused by both
                with pytest.raises(ConfigError):
                    make_params(method, **{name: "no-such-" + name})
                with pytest.raises(ConfigError):
                    job_params.validate(ours, {name: "no-such-" + name}, "params")
                for option in bound.options:
                    assert job_params.validate(ours, {name: option}, "params").model_dump() \
                        == make_params(method, **{name: option}).to_dict()
                continue
            for outside in (bound.low - 1e-9 if not bound.low_open else bound.low,
                            bound.high + 1e-9):
                if abs(outside) == float("inf"):
                    continue
                with pytest.raises(ConfigError):
                    make_params(method, **{name: outside})
                with pytest.raises(ConfigError):
                    job_params.validate(ours, {name: outside}, "params")
    train = job_params.TrainParams()
    config = TrainConfig()
    for field in ("epochs", "batch_size", "lr", "min_lr", "seed", "n_points"):
        assert getattr(train, field) == getattr(config, field), field
    assert train.rank == AdapterConfig().rank and train.alpha == AdapterConfig().alpha
    assert {f.name for f in dataclasses.fields(TrainConfig)} - set(job_params.TrainParams
                                                                    .model_fields) == {"loss"}


def test_routes_and_serialisation() -> None:
    app = make_celery(Settings(redis_url="redis://127.0.0.1:1/0"))
    assert app.conf.task_serializer == "json" and app.conf.accept_content == ["json"]
    assert app.conf.task_acks_late and app.conf.worker_prefetch_multiplier == 1
    assert app.conf.broker_transport_options["global_keyprefix"] == "regcl:celery:"
    assert set(QUEUE_OF.values()) == set(ALL_QUEUES)


def test_the_submission_surface_imports_no_torch() -> None:
    code = ("import sys, workers.submit, workers.celery_app, cli.up; "
            "print(sorted(m for m in ('torch', 'peft', 'segment_anything') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
