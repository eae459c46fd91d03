"""Fixtures of the reliability tests (helpers in ``support.py``)."""

from tests.reliability.support import rig

__all__ = ["rig"]
