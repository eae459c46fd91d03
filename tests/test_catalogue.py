"""The merge-method catalogue is the one list of methods: the library's registry, the
continual state, the job parameters and the API all follow it, and it imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from regcl.errors import ConfigError, StatsError
from regcl.merging import MERGE_METHODS, ContinualMergeState, merge_adapters
from regcl.merging.catalogue import CATALOGUE, STATS_METHODS, STREAMING_METHODS
from workers import params as job_params

LIGHT_MODULES = ("regcl.merging.catalogue", "regcl.merging", "regcl.adapters.layout",
                 "workers.params", "infra.registry", "infra.platform", "infra.base_model")


def test_a_torch_free_import_of_the_catalogue_imports_no_torch() -> None:
    code = (f"import sys, {', '.join(LIGHT_MODULES)}; "
            "from regcl.merging import STREAMING_METHODS, CATALOGUE; "
            "print(sorted(m for m in ('torch', 'peft', 'segment_anything') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_catalogue_method_has_a_merge_function_and_nothing_else_does() -> None:
    assert set(MERGE_METHODS) == set(CATALOGUE)
    for name, method in MERGE_METHODS.items():
        assert method.info is CATALOGUE[name]


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_streaming_and_statistics_follow_the_catalogue(name: str) -> None:
    info = CATALOGUE[name]
    if info.streams:
        ContinualMergeState(name)
    else:
        with pytest.raises(ConfigError, match="continually"):
            ContinualMergeState(name)
    adapter = {"a.lora_A.weight": torch.ones(2, 3)}
    if info.needs_stats:
        with pytest.raises(StatsError):
            merge_adapters(name, [adapter, adapter])
    else:
        merged = merge_adapters(name, [adapter, adapter])
        assert merged.keys() == adapter.keys()


def test_the_job_parameters_offer_exactly_the_streaming_methods() -> None:
    assert tuple(job_params.METHOD_PARAMS) == STREAMING_METHODS
    assert set(STATS_METHODS) <= set(STREAMING_METHODS)
    for name in CATALOGUE:
        body = {"adapters": ["a"], "method": name}
        if name in STREAMING_METHODS:
            job = job_params.validate(job_params.MergeJobParams, body, "merge job")
            assert job.method == name
        else:
            with pytest.raises(ConfigError, match="method"):
                job_params.validate(job_params.MergeJobParams, body, "merge job")


def test_named_options_are_checked_by_the_library_and_the_job_parameters() -> None:
    """A :func:`chosen` parameter (RegMean's Gram weighting, Core Space's inner merge) takes
    exactly its options, in the library and in the published job parameters alike."""
    from regcl.merging import GRAM_WEIGHTINGS, make_params

    schema = job_params.METHOD_PARAMS["regcl_product"].model_json_schema()
    assert schema["properties"]["weighting"]["enum"] == list(GRAM_WEIGHTINGS)
    for weighting in GRAM_WEIGHTINGS:
        assert make_params("regcl", weighting=weighting).weighting == weighting
        job = job_params.validate(job_params.MergeJobParams, {
            "adapters": ["a"], "method": "regcl", "params": {"weighting": weighting}}, "job")
        assert job.method_params()["weighting"] == weighting
    for bad in ("Domain", "", 1.0, None):
        with pytest.raises(ConfigError, match="weighting"):
            make_params("regcl", weighting=bad)
        with pytest.raises(ConfigError, match="weighting"):
            job_params.validate(job_params.MergeJobParams, {
                "adapters": ["a"], "method": "regcl", "params": {"weighting": bad}}, "job")
    assert make_params("core_space", inner="iso").inner == "iso"
    with pytest.raises(ConfigError, match="inner"):
        make_params("core_space", inner="regcl")
