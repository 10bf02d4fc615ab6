"""Reading a process's Prometheus exposition in tests: its samples, and how many series."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

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


def total(samples: dict[Series, float], name: str) -> float:
    """The sum of a metric over all its label values."""
    return sum(value for (sample, _), value in samples.items() if sample == name)


def freshrec_series(samples: dict[Series, float]) -> set[Series]:
    """The project's own series (not the client library's process and runtime ones)."""
    return {series for series in samples if series[0].startswith("freshrec_")}
