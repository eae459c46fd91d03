"""Two merge jobs triggered at once, on two worker processes: they serialise on the merge lock,
version numbers strictly increase, and the later version's lineage holds every domain.

Each merge pauses inside the lock for longer than the lock's lease (REGCL_FAULT_PAUSE), so the
test fails if the lock is not held for the whole merge (e.g. if it were not renewed) or not
taken at all: the second merge would then start from the same parent and drop a domain.
"""

from __future__ import annotations

import threading
import time

import pytest

from infra import keys
from infra.jobs import JobState
from tests.reliability.support import LEASE_S, Rig, poll, say
from tests.service.api_support import make_adapter
from workers.submit import submit_merge

pytestmark = pytest.mark.slow

PAUSE_S = 2 * LEASE_S


def test_two_merges_at_once_serialise_and_keep_every_domain(rig: Rig) -> None:
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        rig.registry.add_adapter(name, make_adapter(rig.root / "adapters" / name, seed))
    rig.start_workers("m1", "m2", env={"REGCL_FAULT_PAUSE": f"fold:{PAUSE_S:g}"})

    submitted: dict[str, str] = {}

    def submit(adapters: list[str]) -> None:
        submitted[adapters[0]] = submit_merge(rig.celery, rig.jobs, adapters=adapters,
                                              activate=True).id
    threads = [threading.Thread(target=submit, args=(names,)) for names in (["a"], ["b", "c"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = list(submitted.values())

    # Both jobs run at the same time on the two workers, but one waits for the lock.
    poll(lambda: all(rig.jobs.get(i).state is JobState.RUNNING for i in ids),
         "both merges to run at once", on_timeout=rig.log_tails)
    holders = [i for i in ids if rig.jobs.get(i).detail.get("phase") is not None]
    start = time.monotonic()
    overlap_s = 0.0
    while all(rig.jobs.get(i).state is JobState.RUNNING for i in ids):
        overlap_s = time.monotonic() - start
        phases = [rig.jobs.get(i).detail.get("phase") for i in ids]
        assert None in phases, f"both merges inside the lock at once: {phases}"
        if not rig.client.exists(keys.MERGE_LOCK):
            # Only between the holder's release and the end of its job (its state is written
            # after the lock is gone); a lease that lapsed mid-merge would leave both running
            # (and fail the holder's fenced registration, checked below).
            poll(lambda: not all(rig.jobs.get(i).state is JobState.RUNNING for i in ids),
                 "the lock's holder to finish once the lock is gone", timeout_s=30.0,
                 on_timeout=rig.log_tails)
            break
        time.sleep(0.1)
    done = [rig.wait(i) for i in ids]
    assert all(d.state is JobState.SUCCEEDED for d in done), [d.error for d in done]
    assert all(d.attempts == 1 for d in done)

    versions = rig.registry.list_versions()
    numbers = [v.number for v in versions]
    assert numbers == sorted(set(numbers)) and len(numbers) == 2
    first, second = versions
    assert second.lineage["parent"] == first.number
    assert set(second.lineage["domains"]) == {"a", "b", "c"}
    assert second.lineage["domains"][: len(first.lineage["domains"])] == \
        first.lineage["domains"]
    assert rig.registry.live_version() == second.number
    assert not rig.client.exists(keys.MERGE_LOCK)
    rig.check_store()
    say(f"two merges submitted at once on two workers, each pausing {PAUSE_S:g} s inside a "
        f"{LEASE_S:g} s lock lease: ran concurrently for {overlap_s:.1f} s with "
        f"{len(holders)} inside the lock at a time; versions {numbers}; lineage "
        f"{first.lineage['domains']} -> {second.lineage['domains']}; live {second.number}")
