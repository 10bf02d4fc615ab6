"""Two readers on one port (SO_REUSEPORT) share the requests and the publishing.

Injects: two reader processes bound to the same port, each with a metrics port of its own, a
worker, and one event for each of 200 users, again for 200 more until both readers have
published (a wave comes due at once, and the reader that pops first may take all of it).
Checks: new connections to the shared port are answered by both readers; every user's list is
published exactly once in all (a user with one event is due once, and due users are popped
atomically); both readers published some within 20 waves;
each reader's own metrics count what it served and published, and the counts add up.
Without FRESHREC_SERVE_REUSE_PORT, a second reader on a port in use exits at once, saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from freshrec.devenv.processes import wait_for
from freshrec.settings import Settings
from freshrec.streams.producer import EventProducer
from tests.metrics_support import scrape, total
from tests.support import (
    TopicReader,
    distinct_free_ports,
    freshrec_process,
    http_json,
    running_reader,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.integration

WAVE = 200
MAX_WAVES = 20
CONNECTIONS = 64
TS = 1_700_000_000.0


@contextlib.contextmanager
def _readers(settings: Settings, port: int, metrics: list[int], logs: Path) -> Iterator[None]:
    """Readers on ``port``, one per metrics port, once each answers there."""
    procs = []
    try:
        for n, metrics_port in enumerate(metrics):
            own = dataclasses.replace(
                settings, serve_reuse_port=True, reader_metrics_port=metrics_port
            )
            log = logs / f"reader-{n}.log"
            procs.append(freshrec_process(["serve", "--port", str(port)], own, log))

        def alive() -> None:
            for n, proc in enumerate(procs):
                log = logs / f"reader-{n}.log"
                assert proc.poll() is None, f"reader {n} exited: {log.read_text()[-3000:]}"

        for metrics_port in metrics:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            wait_for(lambda url=url: scrape(url), 60, f"a reader's metrics on {url}", check=alive)
        # The serving port opens after the metrics port (kernels first): both must be bound.
        wait_for(
            lambda: _served_by_both(port, metrics),
            60,
            "both readers to take connections on the shared port",
            check=alive,
        )
        yield
    finally:
        for proc in procs:
            stop_process(proc)


def _requests(metrics_port: int) -> float:
    samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "freshrec_http_requests_total" and ("route", "/healthz") in labels
    )


def _served_by_both(port: int, metrics: list[int]) -> bool:
    """``CONNECTIONS`` new connections (each a new source port, hashed anew by the kernel)
    reach every reader."""
    before = [_requests(m) for m in metrics]
    for _ in range(CONNECTIONS):
        status, _ = http_json(f"http://127.0.0.1:{port}/healthz")
        assert status == 200
    after = [_requests(m) for m in metrics]
    return all(a > b for a, b in zip(after, before, strict=True))


def test_two_readers_on_one_port_share_requests_and_publish_each_list_once(
    settings: Settings, worker: object, tmp_path: Path
) -> None:
    """Users come due in waves of WAVE (one event each); a wave comes due at once, and a
    reader that pops first may take all of it, so waves follow until both readers have
    published (at most MAX_WAVES: a reader that never publishes fails the test)."""
    port, *metrics = distinct_free_ports(3)
    published = TopicReader(settings.kafka_bootstrap, settings.recommendations_topic)
    sent: list[str] = []

    def every_user_published() -> bool:
        users = {json.loads(m.value())["user_id"] for m in published.poll()}
        return len(users) == len(sent)

    try:
        with _readers(settings, port, metrics, tmp_path):
            served = sum(_requests(m) for m in metrics)
            assert served >= CONNECTIONS
            for _ in range(MAX_WAVES):
                wave = [f"u{n}" for n in range(len(sent), len(sent) + WAVE)]
                events = [
                    {"type": "click", "user_id": user, "item_id": f"i{n % 37}", "ts": TS + n}
                    for n, user in enumerate(wave, start=len(sent))
                ]
                with EventProducer(settings.kafka_bootstrap, settings.events_topic, 1) as producer:
                    producer.send_many(events)
                sent += wave
                wait_until(
                    every_user_published, 120, f"lists for all {len(sent)} users", poll_s=0.2
                )
                counts = [
                    total(
                        scrape(f"http://127.0.0.1:{m}/metrics"),
                        "freshrec_recommendations_published_total",
                    )
                    for m in metrics
                ]
                if all(count > 0 for count in counts):
                    break
        users = [json.loads(m.value())["user_id"] for m in published.poll()]
    finally:
        published.close()
    assert sorted(users) == sorted(sent), "a list published twice"
    assert all(count > 0 for count in counts), f"one reader published nothing: {counts}"
    assert sum(counts) == len(sent), counts


def test_a_second_reader_on_a_port_in_use_exits_at_once_saying_why(
    settings: Settings, tmp_path: Path
) -> None:
    with running_reader(settings, tmp_path / "first.log") as (base, first):
        port = base.rsplit(":", 1)[1]
        log = tmp_path / "second.log"
        second = freshrec_process(["serve", "--port", port], settings, log)
        try:
            wait_until(lambda: second.poll() is not None, 60, "the second reader to exit")
        finally:
            stop_process(second)
        assert second.returncode == 2, log.read_text()[-3000:]
        assert f"cannot take 127.0.0.1:{port}" in log.read_text()
        assert "FRESHREC_SERVE_REUSE_PORT" in log.read_text()
        assert first.poll() is None
        assert http_json(base + "/healthz")[0] == 200
