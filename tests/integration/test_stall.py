"""A worker whose consumer stops handing it its partitions' messages exits, and the worker
started again applies them: the stall watch (`freshrec.streams.stall`) on real services."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from freshrec.connections import kafka_config
from freshrec.devenv.processes import start_freshrec
from freshrec.settings import Settings
from freshrec.streams.events import encode_events
from freshrec.streams.producer import EventProducer
from freshrec.streams.worker import EXIT_STALLED, OBSERVE_EVERY_S
from tests.metrics_support import scrape
from tests.support import (
    applied_events,
    free_port,
    partition_watermarks,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 6.0
EVENTS = 40
TS = time.time() - 60


def test_a_stalled_consumer_exits_the_worker_and_its_restart_applies_what_waited(
    settings: Settings, redis_client, tmp_path: Path
) -> None:
    log = tmp_path / "stalled.log"
    stalled = start_freshrec([str(LIMIT_S)], settings, log, module="tests.stalled_worker", cwd=ROOT)
    try:
        wait_until(
            lambda: stalled.poll() is not None or "paused for good" in log.read_text(),
            60,
            "the stalled worker to own its partitions",
        )
        with EventProducer(settings.kafka_bootstrap, settings.events_topic) as producer:
            for n in range(EVENTS):
                producer.send(
                    {"type": "click", "user_id": f"u{n}", "item_id": f"i{n % 7}", "ts": TS}
                )
        assert stalled.poll() is None, log.read_text()[-3000:]  # nothing waited before
        status = stalled.wait(timeout=LIMIT_S + 60)
        text = log.read_text()
        assert status == EXIT_STALLED, text[-3000:]
        assert "has handed this worker nothing" in text and "while messages wait" in text
        # Each partition named waits from offset 0 (nothing was taken) with events in it.
        named = re.findall(r"events/\d+ next (\d+) of (\d+)", text)
        assert named and all(int(n) == 0 < int(end) <= EVENTS for n, end in named), named
        assert applied_events(redis_client, settings) == 0  # nothing was learned meanwhile
    finally:
        stop_process(stalled)
    restarted = start_freshrec(["worker", "--loglevel", "warning"], settings, tmp_path / "w.log")
    try:
        wait_until(
            lambda: (
                applied_events(redis_client, settings) == EVENTS or restarted.poll() is not None
            ),
            90,
            "the restarted worker to apply every event that waited",
        )
        assert restarted.poll() is None, (tmp_path / "w.log").read_text()[-3000:]
    finally:
        stop_process(restarted)


def test_partitions_written_in_transactions_are_not_stalled_idle_or_held_open(
    settings: Settings, redis_client, tmp_path: Path
) -> None:
    """A transaction's commit marker takes an offset that no agent takes: once every event is
    applied, the end offsets stay past the last message taken. The consumer's position moves
    past the marker, so the watch sees the partitions caught up and the worker stays. A
    transaction left open holds back its events (the consumer reads committed ones only) and
    is no stall either: the watch compares with the last stable offset. The lag gauge takes
    the watch's figures, so it shows neither the markers nor the open transaction's events."""
    log = tmp_path / "watched.log"
    settings = dataclasses.replace(settings, worker_metrics_port=free_port())
    metrics = f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"
    watched = start_freshrec(
        [str(LIMIT_S), "run"], settings, log, module="tests.stalled_worker", cwd=ROOT
    )
    producer = None
    try:
        wait_until(
            lambda: watched.poll() is not None or "partitions owned" in log.read_text(),
            60,
            "the worker to own its partitions",
        )
        producer = Producer(kafka_config(settings, **{"transactional.id": settings.topic_prefix}))
        producer.init_transactions(30)
        for first in range(0, EVENTS, EVENTS // 2):  # two transactions, two markers a partition
            _in_transaction(producer, settings.events_topic, range(first, first + EVENTS // 2))
            producer.commit_transaction(30)
        wait_until(
            lambda: applied_events(redis_client, settings) == EVENTS or watched.poll() is not None,
            60,
            "the worker to apply every event",
        )
        marks = partition_watermarks(redis_client, settings)
        ends = _end_offsets(settings)
        assert marks and all(ends[p] > mark + 1 for p, mark in marks.items()), (marks, ends)
        wait_until(lambda: _events_lag(metrics) == [0] * settings.partitions, 30, "no lag")
        # Idle past the limit and two of the watch's ticks: a stall would have been counted.
        try:
            status = watched.wait(timeout=LIMIT_S + 2 * OBSERVE_EVERY_S + 5)
        except subprocess.TimeoutExpired:
            status = None
        assert status is None, log.read_text()[-3000:]
        _in_transaction(producer, settings.events_topic, range(EVENTS, EVENTS + 10))
        producer.flush(30)
        try:  # open through the limit and two ticks: its events wait, nothing is stalled
            status = watched.wait(timeout=LIMIT_S + 2 * OBSERVE_EVERY_S + 5)
        except subprocess.TimeoutExpired:
            status = None
        assert status is None, log.read_text()[-3000:]
        assert applied_events(redis_client, settings) == EVENTS
        assert _events_lag(metrics) == [0] * settings.partitions  # nothing committed waits
        producer.commit_transaction(30)
        wait_until(
            lambda: (
                applied_events(redis_client, settings) == EVENTS + 10 or watched.poll() is not None
            ),
            60,
            "the worker to apply the events of the transaction once committed",
        )
        assert watched.poll() is None, log.read_text()[-3000:]
    finally:
        stop_process(watched)
        if producer is not None:  # a transaction a failed assertion left open
            with contextlib.suppress(KafkaException):
                producer.abort_transaction(10)


def _events_lag(metrics: str) -> list[float]:
    """The worker's lag gauge for each partition of the events topic, in partition order."""
    samples = scrape(metrics)
    lags = {
        dict(labels)["partition"]: value
        for (name, labels), value in samples.items()
        if name == "freshrec_consumer_lag_messages" and dict(labels)["topic"] == "events"
    }
    return [lags[p] for p in sorted(lags)]


def _in_transaction(producer: Producer, topic: str, users: range) -> None:
    """Begins a transaction and writes one click per user in it, keyed by user."""
    producer.begin_transaction()
    for n in users:
        event = {"type": "click", "user_id": f"u{n}", "item_id": f"i{n % 7}", "ts": TS}
        producer.produce(topic, encode_events(event), key=f"u{n}".encode())


def _end_offsets(settings: Settings) -> dict[int, int]:
    """Each events partition's end offset (past the last message and any marker)."""
    consumer = Consumer(kafka_config(settings, **{"group.id": f"{settings.topic_prefix}-ends"}))
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(settings.events_topic, p), 10)[1]
            for p in range(settings.partitions)
        }
    finally:
        consumer.close()
