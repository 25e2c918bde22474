"""Latency measurement: warm-up, then timed calls until the median is stable.

Each timed call is ``engine.run(x)`` followed by ``engine.sync()`` (CUDA synchronisation on a GPU), measured with
``time.perf_counter_ns``. Measurement stops once there are at least ``min_iters`` samples covering ``min_seconds``
and the 95% confidence interval of the median (order-statistic interval, no distribution assumed) is within
``rel_ci`` of the median — or when ``max_seconds`` have passed (then ``stable`` is false).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Timing:
    batch: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    cv: float  # coefficient of variation: std / mean
    median_ci_rel: float  # half-width of the median's 95% CI / median
    throughput: float  # images per second at the mean latency (back-to-back batches)
    stable: bool

    def as_dict(self) -> dict:
        return asdict(self)


def median_ci_rel(samples: np.ndarray) -> float:
    """Half-width of the 95% order-statistic confidence interval of the median, relative to the median."""
    n = len(samples)
    if n < 6:
        return math.inf
    s = np.sort(samples)
    half = 1.96 * math.sqrt(n) / 2
    lo, hi = int(math.floor(n / 2 - half)), int(math.ceil(n / 2 + half))
    lo, hi = max(lo, 0), min(hi, n - 1)
    med = float(np.median(s))
    return float((s[hi] - s[lo]) / 2 / med) if med > 0 else math.inf


def summarize(batch: int, samples_ns: list[int], stable: bool) -> Timing:
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    mean = float(ms.mean())
    return Timing(batch=batch, iterations=len(ms), p50_ms=float(np.percentile(ms, 50)),
                  p90_ms=float(np.percentile(ms, 90)), p99_ms=float(np.percentile(ms, 99)), mean_ms=mean,
                  min_ms=float(ms.min()), cv=float(ms.std() / mean) if mean > 0 else 0.0,
                  median_ci_rel=median_ci_rel(ms), throughput=batch / mean * 1e3 if mean > 0 else 0.0, stable=stable)


def measure(engine, images: np.ndarray, *, warmup_s: float = 0.2, min_warmup: int = 3, min_iters: int = 20,
            min_seconds: float = 0.3, max_seconds: float = 3.0, rel_ci: float = 0.02) -> Timing:
    """Time ``engine`` on one batch (``images``, the model's input) as described in the module docstring."""
    engine.check_batch(images.shape[0])
    x = engine.prepare(images)
    clock = time.perf_counter_ns
    min_seconds = min(min_seconds, max_seconds)
    start = clock()
    done = 0
    while done < min_warmup or clock() - start < warmup_s * 1e9:
        engine.run(x)
        engine.sync()
        done += 1
    samples: list[int] = []
    start = clock()
    while True:
        t0 = clock()
        engine.run(x)
        engine.sync()
        t1 = clock()
        samples.append(t1 - t0)
        n, elapsed = len(samples), (t1 - start) / 1e9
        # the interval costs a sort: check it every ~10% more samples
        if n >= min_iters and elapsed >= min_seconds and n % max(1, n // 10) == 0:
            if median_ci_rel(np.asarray(samples)) <= rel_ci:
                return summarize(images.shape[0], samples, stable=True)
        if elapsed >= max_seconds and n >= 6:
            return summarize(images.shape[0], samples, stable=median_ci_rel(np.asarray(samples)) <= rel_ci)
