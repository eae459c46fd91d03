"""Time and peak memory of each phase of a job, written to the worker's log.

Peak resident memory comes from Linux's ``VmHWM`` (``/proc/self/status``), reset at the start
of every phase through ``/proc/self/clear_refs``, so each phase reports its own peak; where
that is not possible the process-wide peak (``getrusage``) is reported instead, flagged
``since start``. On CUDA the peak of torch's allocator is reported too (reset per phase), but
only once the job has initialised CUDA itself: nothing here imports torch or touches a GPU.

Log line per phase (``grep 'phase .* took'`` in a worker's log)::

    job <id> phase train took 41.2 s, peak RSS 5801 MiB, peak CUDA 3120 MiB
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path

__all__ = ["PhaseMeter", "peak_rss_mib", "reset_peak_rss"]

logger = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MIB = 1024 * 1024


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (since the last reset, where supported)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count at the current RSS (Linux); False where that is impossible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _cuda() -> object | None:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


class PhaseMeter:
    """Measures the phases of one job in turn: :meth:`start` ends the previous phase and logs
    its time and peaks; :meth:`finish` ends the last one and logs the job's totals."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.phases: dict[str, dict[str, float]] = {}
        self._name: str | None = None
        self._started = self._job_started = time.monotonic()
        self._resettable = False

    def start(self, name: str) -> None:
        self._end()
        self._name, self._started = name, time.monotonic()
        self._resettable = reset_peak_rss()
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()

    def _end(self) -> None:
        if self._name is None:
            return
        figures = {"seconds": round(time.monotonic() - self._started, 2),
                   "peak_rss_mib": round(peak_rss_mib())}
        cuda = _cuda()
        if cuda is not None:
            figures["peak_cuda_mib"] = round(cuda.max_memory_allocated() / _MIB)
        self.phases[self._name] = figures
        logger.info("job %s phase %s took %.1f s, peak RSS %d MiB%s%s", self.job_id,
                    self._name, figures["seconds"], figures["peak_rss_mib"],
                    "" if self._resettable else " (since start)",
                    f", peak CUDA {figures['peak_cuda_mib']} MiB"
                    if "peak_cuda_mib" in figures else "")
        self._name = None

    def finish(self) -> None:
        self._end()
        if self.phases:
            logger.info("job %s took %.1f s in all, peak RSS %d MiB", self.job_id,
                        time.monotonic() - self._job_started,
                        max(p["peak_rss_mib"] for p in self.phases.values()))
