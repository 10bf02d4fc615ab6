"""The exported metrics: complete, and bounded whatever the traffic."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from freshrec.settings import Settings
from freshrec.streams.producer import EventProducer
from tests.metrics_support import freshrec_series, metered_worker, scrape, total
from tests.support import (
    free_port,
    http_json,
    running_reader,
    wait_until,
)

pytestmark = pytest.mark.integration

NOW = time.time()
KINDS = ("click", "view", "rating", "purchase")


def _events(tag: str, count: int, users: int, items: int) -> list[dict]:
    """``count`` events of every kind over ``users`` users and ``items`` items."""
    events = []
    for n in range(count):
        kind = KINDS[n % len(KINDS)]
        event = {
            "type": kind,
            "user_id": f"{tag}-u{n % users}",
            "item_id": f"{tag}-i{n % items}",
            "ts": NOW - 3600 + n * 0.01,
        }
        if kind == "rating":
            event["value"] = float(1 + n % 5)
        events.append(event)
    return events


@pytest.fixture
def metered(settings: Settings) -> Settings:
    """The test's settings with the worker's metrics served on a port of their own."""
    return dataclasses.replace(settings, worker_metrics_port=free_port())


@pytest.fixture
def worker_metrics(metered: Settings, tmp_path: Path) -> Iterator[str]:
    with metered_worker(metered, tmp_path / "worker.log") as url:
        yield url


def _traffic(metered: Settings, base: str, worker: str, tag: str, events: list[dict]) -> None:
    """Replay ``events`` (and one poison message), wait until the worker learned them, then
    ask the reader every kind of question about some of their users and items."""
    before = total(scrape(worker), "freshrec_events_total")
    with EventProducer(metered.kafka_bootstrap, metered.events_topic, 100) as producer:
        producer.send_many(events)
    poison = Producer({"bootstrap.servers": metered.kafka_bootstrap, "log_level": 3})
    poison.produce(metered.events_topic, key=b"x", value=b"{not json")
    assert poison.flush(30) == 0
    wait_until(
        lambda: total(scrape(worker), "freshrec_events_total") >= before + len(events),
        180,
        f"the worker to learn {len(events)} events",
        poll_s=0.5,
    )
    users = sorted({e["user_id"] for e in events})[:200]
    items = sorted({e["item_id"] for e in events})[:50]
    for user in users:
        assert http_json(f"{base}/recommendations/{user}?k=10")[0] == 200
    for item in items:
        assert http_json(f"{base}/similar/{item}?k=5")[0] in (200, 404)
        assert http_json(f"{base}/predict/{users[0]}/{item}")[0] == 200
    assert http_json(f"{base}/similar/{tag}-nobody-mentioned")[0] == 404
    assert http_json(f"{base}/recommendations/{tag}-stranger")[0] == 200


def test_ten_thousand_new_users_and_items_add_no_series(
    metered: Settings, worker_metrics: str, tmp_path: Path
) -> None:
    with running_reader(metered, tmp_path / "reader.log") as (base, _):
        reader = f"{base}/metrics"
        scrape(reader)  # a scrape is a request too: its own series exist from here on
        # Few users and items, but events enough for every windowed statistic to report
        # (the drift monitor's divergences need several windows of 500): the series a long
        # run has, so that only the number of distinct users and items differs below.
        _traffic(metered, base, worker_metrics, "small", _events("small", 5_000, 40, 40))
        # The lag gauges come with the worker's first observation of every partition it owns.
        wait_until(
            lambda: (
                len({s for s in scrape(worker_metrics) if s[0] == "freshrec_consumer_lag_messages"})
                == 2 * metered.partitions
            ),
            30,
            "the consumer lag of both topics' partitions",
            poll_s=0.5,
        )
        worker_small = freshrec_series(scrape(worker_metrics))
        reader_small = freshrec_series(scrape(reader))

        _traffic(metered, base, worker_metrics, "big", _events("big", 10_000, 10_000, 10_000))
        wait_until(
            lambda: total(scrape(reader), "freshrec_catalogue_items") >= 10_000,
            60,
            "the reader's snapshot to hold the 10,000 new items",
            poll_s=0.5,
        )
        worker_big = freshrec_series(scrape(worker_metrics))
        reader_big = freshrec_series(scrape(reader))

    print(f"worker series {len(worker_small)} -> {len(worker_big)}")
    print(f"reader series {len(reader_small)} -> {len(reader_big)}")
    assert worker_big == worker_small, worker_big ^ worker_small
    assert reader_big == reader_small, reader_big ^ reader_small
