"""Resident memory of this process over a block of work (Linux ``/proc``): for the memory benchmarks."""

from __future__ import annotations

import gc
import threading


def trim() -> None:
    """Collect garbage and have glibc hand freed heap back, so resident memory shows what is held."""
    from weights.load import release_freed_memory

    gc.collect()
    release_freed_memory()


def _status() -> dict[str, int]:
    """VmRSS and RssAnon of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon"):
                out[{"VmRSS": "rss", "RssAnon": "anon"}[key]] = int(line.split()[1]) * 1024
    return out


class MemoryWatch:
    """Resident memory at the start, at the end and at its peak (sampled every 5 ms) of a ``with`` block."""

    def __enter__(self) -> "MemoryWatch":
        trim()
        self.start = _status()
        self.peak = dict(self.start)
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.005):
                for k, v in _status().items():
                    self.peak[k] = max(self.peak[k], v)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        trim()
        self.end = _status()

    def grown(self) -> dict[str, int]:
        return {**{k: self.end[k] - self.start[k] for k in self.start},
                **{f"peak_{k}": self.peak[k] - self.start[k] for k in self.start}}
