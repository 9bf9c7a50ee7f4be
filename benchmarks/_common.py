"""Helpers shared by the benchmark scripts: timing, peak memory, table printing."""

from __future__ import annotations

import logging
import resource
import statistics
import time
from collections.abc import Callable


def timeit(fn: Callable[[], object], *, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(rows: list[dict], title: str | None = None) -> str:
    """Print rows (dicts with the same keys) as a Markdown table and return the text."""
    if not rows:
        return ""
    cols = list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = []
    if title:
        lines.append(f"\n### {title}\n")
    lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=False)) + " |")
    lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    for row in cells:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


class StageSeconds(logging.Handler):
    """Collects the package's timing records (``cellsymphony._settings.log_seconds``): seconds per stage name,
    a list per name (one entry per epoch, per call)."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.seconds: dict[str, list[float]] = {}

    def emit(self, record):
        if hasattr(record, "stage"):
            self.seconds.setdefault(record.stage, []).append(float(record.seconds))

    def __enter__(self):
        log = logging.getLogger("cellsymphony")
        self._level = log.level
        log.addHandler(self)
        log.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc):
        log = logging.getLogger("cellsymphony")
        log.removeHandler(self)
        log.setLevel(self._level)
