"""A worker whose consumer stops handing it its partitions' messages exits, and the worker
started again applies them: the stall watch (`freshrec.streams.stall`) on real services."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from freshrec.devenv.processes import start_freshrec
from freshrec.settings import Settings
from freshrec.streams.producer import EventProducer
from freshrec.streams.worker import EXIT_STALLED
from tests.support import applied_events, stop_process, wait_until

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
