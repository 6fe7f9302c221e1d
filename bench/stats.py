"""Repeated measurements and their summary (median, min, max)."""
from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Series:
    """The samples of one figure, e.g. seconds of a full backup to NFS, one per repeat."""

    unit: str  # "s", "B", ...
    samples: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.samples.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def low(self) -> float:
        return min(self.samples, default=float("nan"))

    @property
    def high(self) -> float:
        return max(self.samples, default=float("nan"))

    def to_json(self) -> dict[str, object]:
        return {"unit": self.unit, "median": self.median, "min": self.low, "max": self.high,
                "samples": self.samples}


@contextmanager
def timed(series: Series) -> Iterator[None]:
    """Add the wall time of the ``with`` body to ``series`` (only when it succeeds)."""
    start = time.monotonic()
    yield
    series.add(time.monotonic() - start)


def ratio(ours: Series, bare: Series) -> float:
    return ours.median / bare.median if bare.samples and bare.median else float("nan")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def spread(series: Series) -> str:
    """``median [min-max]`` in the series' unit."""
    if not series.samples:
        return "-"
    if series.unit == "B":
        return f"{human_bytes(series.median)} [{human_bytes(series.low)}-{human_bytes(series.high)}]"
    return f"{series.median:.2f} [{series.low:.2f}-{series.high:.2f}]"
