"""No two test groups on one Redis database (see tests/databases.py)."""

from __future__ import annotations

from collections import Counter

from tests.databases import REDIS_DATABASES, all_databases


def test_every_group_has_its_own_database() -> None:
    numbers = all_databases()
    assert len(numbers) >= 7
    shared = {db: [n for n, v in numbers.items() if v == db]
              for db, count in Counter(numbers.values()).items() if count > 1}
    assert not shared, f"test groups sharing a Redis database: {shared}"
    assert all(0 <= db < REDIS_DATABASES for db in numbers.values()), numbers
