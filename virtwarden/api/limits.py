"""Limits of the HTTP API that live in one process's memory: per-token rate limits and
the rate at which refusals are logged.

Rate limits are token buckets, one per caller name: a bucket holds up to ``burst``
requests and refills at ``rate`` a second; a request finding it empty is refused with
429 and ``Retry-After`` (whole seconds until a request would pass). Buckets belong to
one API process: behind a load balancer spreading over N processes, a token may make up
to N times its rate. Nothing about them is stored in the catalog, so a flood costs no
writes.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class TokenBucket:
    rate: float  # requests per second
    burst: int
    level: float
    at: float  # when ``level`` was measured (monotonic seconds)

    def take(self, now: float) -> float:
        """0 when a request may pass now (and takes its place), else the seconds to wait."""
        self.level = min(float(self.burst), self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate


class RateLimiter:
    """One bucket per caller; a caller's rate and burst may change (the token file was
    edited) and apply from its next request."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def retry_after(self, caller: str, rate: float, burst: int) -> int:
        """0 when the request may pass, else the whole seconds to put in Retry-After."""
        with self._lock:
            now = self._clock()
            bucket = self._buckets.get(caller)
            if bucket is None:
                bucket = self._buckets[caller] = TokenBucket(rate, burst, float(burst), now)
            bucket.rate, bucket.burst = rate, burst
            wait = bucket.take(now)
        return 0 if wait <= 0 else max(1, math.ceil(wait))


class LogThrottle:
    """Logs the first message of each kind, then at most one a ``period``, saying how
    many were left out meanwhile: a flood of bad requests cannot flood the log."""

    def __init__(self, logger: logging.Logger, period: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.period, self._clock = logger, period, clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, msg: str, *args: object) -> None:
        with self._lock:
            now = self._clock()
            last = self._last.get(kind)
            if last is not None and now - last < self.period:
                self._left_out[kind] = self._left_out.get(kind, 0) + 1
                return
            self._last[kind] = now
            left_out = self._left_out.pop(kind, 0)
        if left_out:
            self.logger.warning(msg + " (and %d more like it since the last one logged)", *args, left_out)
        else:
            self.logger.warning(msg, *args)
