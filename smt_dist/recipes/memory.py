"""Peak memory of each phase of a rank: what a device would hold, per phase, from load to merge.

On a GPU that is ``torch.cuda.max_memory_allocated`` between phase boundaries. On the CPU it is
the process's *anonymous* resident memory (``RssAnon``), sampled by a background thread every
few milliseconds: pages of a memory-mapped checkpoint are shared page cache and would not be on a
device, so ``VmHWM``, which counts them, overstates a rank's own memory. Sampling can miss a spike
shorter than its interval; the allocations that matter here (weights, gathered layers) live far
longer.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def rss_anon_bytes() -> int:
    """This process's anonymous resident memory in bytes (0 where /proc is unavailable)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PhaseMemory:
    """Per-phase peaks of one rank; a no-op unless ``enabled``.

    Use ``with memory.phase("train"):`` around each phase; a phase entered again (checkpoints
    between training steps) keeps its highest peak. ``report()`` gives MiB per phase.
    """

    def __init__(self, *, enabled: bool, interval: float = 0.002) -> None:
        self.enabled = enabled
        self.interval = interval
        self.peaks: dict[str, dict[str, float]] = {}
        self._current: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda = torch.cuda.is_available()
        if enabled:
            self._thread = threading.Thread(target=self._sample, name="smt-memory", daemon=True)
            self._thread.start()

    def _record(self, value: int) -> None:
        with self._lock:
            if self._current is not None:
                entry = self.peaks.setdefault(self._current, {})
                entry["host_mib"] = max(entry.get("host_mib", 0.0), value / 2**20)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._record(rss_anon_bytes())
            time.sleep(self.interval)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute memory to ``name`` inside the block."""
        if not self.enabled:
            yield
            return
        previous = self._current
        self._enter(name)
        try:
            yield
        finally:
            self._enter(previous)

    def _enter(self, name: str | None) -> None:
        self._record(rss_anon_bytes())
        if self._cuda and self._current is not None:
            entry = self.peaks.setdefault(self._current, {})
            peak = torch.cuda.max_memory_allocated() / 2**20
            entry["cuda_mib"] = max(entry.get("cuda_mib", 0.0), peak)
        with self._lock:
            self._current = name
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self._record(rss_anon_bytes())

    def current_peak_mib(self) -> float:
        """This rank's peak MiB in the current phase so far, for the training log.

        On a GPU the CUDA peak; on the CPU the sampled anonymous-RSS peak, or the anonymous RSS
        now when sampling is off (``--report_memory`` not given).
        """
        if self._cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        with self._lock:
            sampled = self.peaks.get(self._current, {}).get("host_mib") if self.enabled else None
        return sampled if sampled is not None else rss_anon_bytes() / 2**20

    def report(self) -> dict[str, dict[str, float]]:
        """Peak MiB per phase: ``host_mib`` (anonymous RSS) and, on a GPU, ``cuda_mib``."""
        with self._lock:
            return {name: {k: round(v, 1) for k, v in entry.items()} for name, entry in self.peaks.items()}

    def close(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
