"""Redis refusing writes holds the worker's batches; nothing is lost or applied twice.

The real-server test makes the test's Redis refuse writes with OOM (``maxmemory`` below what it
uses, ``noeviction``), checks that the worker says it is holding its batches and applies
nothing meanwhile, then lifts the limit and checks every event is applied exactly once. The
tests without the integration mark check the failure policy itself (transient or fatal).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from redis import exceptions as redis_errors

from freshrec.settings import Settings
from freshrec.store.keys import Keys
from freshrec.streams.producer import EventProducer
from tests.support import wait_until

TS = time.time() - 60
USERS = 12


def _click(n: int) -> bytes:
    return json.dumps(
        {"type": "click", "user_id": f"held-{n}", "item_id": f"item-{n}", "ts": TS}
    ).encode()


def _impression(n: int) -> bytes:
    return json.dumps(
        {
            "request_id": f"r-{n}",
            "user_id": f"seen-{n}",
            "variant": "control",
            "ts": TS,
            "items": [{"item_id": f"shown-{n}", "position": 0, "features": {"mf": 0.5}}],
        }
    ).encode()


@pytest.mark.integration
def test_a_full_redis_holds_every_batch_until_it_accepts_writes_then_applies_each_once(
    settings: Settings, worker, redis_client, tmp_path: Path
) -> None:
    log_path = tmp_path / "worker.log"
    prefix = settings.key_prefix
    stats = f"{prefix}:stats:worker"
    before = redis_client.config_get("maxmemory*")
    try:
        used = int(redis_client.info("memory")["used_memory"])
        redis_client.config_set("maxmemory-policy", "noeviction")
        # Below what the server uses: with noeviction every write is refused (OOM), reads work.
        redis_client.config_set("maxmemory", max(1, used // 2))
        with pytest.raises(redis_errors.OutOfMemoryError):
            redis_client.set(f"{prefix}:probe", "1")

        with EventProducer(settings.kafka_bootstrap, settings.events_topic) as producer:
            for n in range(USERS):
                producer.send_raw(_click(n), key=f"held-{n}".encode())
        with EventProducer(settings.kafka_bootstrap, settings.impressions_topic) as producer:
            for n in range(3):
                producer.send_raw(_impression(n), key=f"seen-{n}".encode())

        def held() -> bool:
            text = log_path.read_text(errors="replace")
            return "events" in text and "impressions" in text and "(oom)" in text

        wait_until(
            lambda: worker.poll() is not None or held(),
            60,
            "the worker to report both agents holding batches Redis refused (OOM)",
        )
        assert worker.poll() is None, log_path.read_text()[-3000:]
        text = log_path.read_text(errors="replace")
        assert "Redis refused applying" in text, text[-3000:]
        # Nothing landed while Redis refused writes.
        for n in range(USERS):
            assert not redis_client.exists(Keys(prefix).history(f"held-{n}")), n
        for n in range(3):
            assert not redis_client.exists(Keys(prefix).shown(f"seen-{n}")), n
        assert redis_client.hget(stats, "events") is None
    finally:
        redis_client.config_set("maxmemory", before["maxmemory"])
        redis_client.config_set("maxmemory-policy", before["maxmemory-policy"])

    for n in range(USERS):
        wait_until(
            lambda n=n: redis_client.zscore(Keys(prefix).history(f"held-{n}"), f"item-{n}"),
            60,
            f"held click {n} to be applied once Redis accepts writes",
        )
    for n in range(3):
        wait_until(
            lambda n=n: redis_client.hget(Keys(prefix).shown(f"seen-{n}"), f"shown-{n}"),
            60,
            f"held impression {n} to be recorded once Redis accepts writes",
        )
    # Exactly once: each click and each shown item counted by the one batch that applied it.
    wait_until(
        lambda: int(redis_client.hget(stats, "events") or 0) >= USERS + 3,
        30,
        "every held event counted",
    )
    assert int(redis_client.hget(stats, "events")) == USERS + 3
    wait_until(
        lambda: "Redis accepted" in log_path.read_text(errors="replace"),
        30,
        "the worker to report Redis accepting the held batches",
    )
    assert worker.poll() is None, "the worker stopped"
