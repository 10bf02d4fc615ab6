"""Metrics in tests: a worker that serves them, and reading a process's exposition."""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from freshrec.settings import Settings
from tests.support import freshrec_process, group_is_consuming, stop_process, wait_until

Series = tuple[str, tuple[tuple[str, str], ...]]


def scrape(url: str, timeout_s: float = 5.0) -> dict[Series, float]:
    """Every sample of ``url`` (a /metrics page): (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    samples: dict[Series, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5.0):
            return True
    except OSError:
        return False


def total(samples: dict[Series, float], name: str) -> float:
    """The sum of a metric over all its label values."""
    return sum(value for (sample, _), value in samples.items() if sample == name)


def freshrec_series(samples: dict[Series, float]) -> set[Series]:
    """The project's own series (not the client library's process and runtime ones)."""
    return {series for series in samples if series[0].startswith("freshrec_")}


@contextlib.contextmanager
def metered_worker(settings: Settings, log: Path) -> Iterator[str]:
    """A worker serving its metrics on ``settings.worker_metrics_port``; yields their URL."""
    proc = freshrec_process(["worker", "--loglevel", "warning"], settings, log)
    url = f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"
    try:
        # Its metrics are served by a task of the app, which need not have run by the time the
        # worker has joined its group: both are waited for.
        wait_until(
            lambda: (
                proc.poll() is not None
                or (
                    group_is_consuming(settings.kafka_bootstrap, f"{settings.topic_prefix}-worker")
                    and _answers(url)
                )
            ),
            60,
            "the worker to join its consumer group and serve its metrics",
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        yield url
    finally:
        stop_process(proc)
