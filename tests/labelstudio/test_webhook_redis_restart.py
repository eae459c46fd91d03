"""redis-server SIGKILLed and restarted (append-only file on) in the middle of a burst of
annotation webhooks (#24 case 2, second part; opt-in: ``REGCL_TEST_MORE_FAULTS=1``). A private
redis-server and API (``tests.reliability.support.Rig``), the tests' file origin as Label
Studio. Every webhook the API answered 200 (``ok`` or ``queued``) is stored exactly once; those
it could not take (no answer, 5xx) are sent again afterwards, as Label Studio's sync would
bring them, and are then stored once too."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import redis

from infra import keys
from infra.sample_sets import SampleSets, default_domain
from tests.labelstudio.burst import make_burst, send_open_loop, stored_figures
from tests.labelstudio.file_origin import TOKEN, FileOrigin
from tests.reliability.support import Rig, more_faults, poll, rig, say
from tests.service.api_support import ADMIN_KEY

__all__ = ["rig"]  # the fixture, from the reliability tests

pytestmark = more_faults

SIZE = (96, 128)
COUNT = 60
RATE = 20.0
CRASH_AFTER_S = 1.0
DOWN_S = 1.0


def _drained(client: redis.Redis) -> bool:
    return not client.xlen(keys.LS_INGEST) and not client.exists(keys.LS_INGEST_LOCK)


def test_redis_restarted_during_a_webhook_burst_loses_and_doubles_nothing(
        rig: Rig, origin: FileOrigin) -> None:
    api = rig.start_api(REGCL_LABEL_STUDIO_URL=origin.url, REGCL_LABEL_STUDIO_API_KEY=TOKEN)
    project = 884
    events = make_burst(origin, project, COUNT, SIZE, first_id=884_000)
    ids = [e["annotation"]["id"] for e in events]

    def crash_and_restart() -> None:
        rig.crash_redis()
        time.sleep(DOWN_S)
        rig.start_redis()

    fault = threading.Timer(CRASH_AFTER_S, crash_and_restart)
    fault.start()
    answers = send_open_loop(api.url, events, RATE)
    fault.join()
    by_answer = Counter(a.status if a.status != 200 else f"200 {(a.body or {}).get('status')}"
                        for a in answers)
    taken = [i for i, a in zip(ids, answers, strict=True) if a.status == 200]
    refused = [e for e, a in zip(events, answers, strict=True) if a.status != 200]
    poll(lambda: _drained(rig.client), "the ingest queue to drain", timeout_s=180)
    sets = SampleSets(rig.client, rig.store, rig.datasets)
    domain = default_domain(project)
    first = stored_figures(rig.client, sets, domain, taken)

    with httpx.Client(base_url=api.url, auth=("labelstudio", ADMIN_KEY), timeout=60) as admin:
        again = Counter(admin.post("/labelstudio/webhook", json=e).status_code for e in refused)
    poll(lambda: _drained(rig.client), "the ingest queue to drain", timeout_s=180)
    final = stored_figures(rig.client, sets, domain, ids)
    say(f"redis SIGKILLed {CRASH_AFTER_S:g} s into a burst of {COUNT} webhooks at {RATE:g}/s, "
        f"down {DOWN_S:g} s: answers {dict(by_answer)}; of the {len(taken)} answered 200: "
        f"{first}; the {len(refused)} others sent again: {dict(again)}; all {COUNT}: {final}")
    assert first == {"stored": len(taken), "lost": 0, "duplicated": 0, "missing_files": 0}
    assert set(again) <= {200}
    assert final == {"stored": COUNT, "lost": 0, "duplicated": 0, "missing_files": 0}
