"""Serving never waits for Kafka: impressions that cannot be queued are dropped and counted."""

from __future__ import annotations

import time

import numpy as np
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from freshrec.models.click_model import FEATURES
from freshrec.serving.funnel import Candidate, Served
from freshrec.serving.impressions import ImpressionLog
from tests.support import free_port


def test_logging_returns_at_once_when_kafka_is_unreachable() -> None:
    # A real producer aimed at a port where nothing listens, with room for one message.
    producer = Producer(
        {
            "bootstrap.servers": f"127.0.0.1:{free_port()}",
            "queue.buffering.max.messages": 1,
            "log_level": 0,
        }
    )
    log = ImpressionLog(producer, "freshrec.impressions")
    served = Served([Candidate("i1", ["cf"])], None, np.zeros((1, len(FEATURES))), {})

    def dropped() -> float:
        return REGISTRY.get_sample_value("freshrec_impressions_dropped_total") or 0.0

    before = dropped()
    started = time.perf_counter()
    for n in range(50):
        log.log(f"r{n}", "u1", "control", served)
    assert time.perf_counter() - started < 1.0
    assert dropped() - before == 49  # the first one is queued


def test_an_impression_the_producer_refuses_is_dropped_and_counted_not_raised() -> None:
    # A real producer whose size limit the list's features are over: produce() raises.
    producer = Producer(
        {"bootstrap.servers": f"127.0.0.1:{free_port()}", "message.max.bytes": 1000, "log_level": 0}
    )
    log = ImpressionLog(producer, "freshrec.impressions")
    items = [Candidate(f"i{n}", ["cf"]) for n in range(20)]
    served = Served(items, None, np.ones((20, len(FEATURES))), {})
    before = REGISTRY.get_sample_value("freshrec_impressions_dropped_total") or 0.0
    log.log("r1", "u1", "control", served)
    assert REGISTRY.get_sample_value("freshrec_impressions_dropped_total") == before + 1
