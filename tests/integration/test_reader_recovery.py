"""A Redis outage: the reader answers 503 with a JSON error, then recovers by itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from freshrec.settings import Settings
from tests.support import OwnRedis, http_json, running_reader, wait_until

pytestmark = pytest.mark.integration


def test_the_reader_answers_503_while_redis_is_down_and_recovers(
    settings: Settings, own_redis: OwnRedis, tmp_path: Path
) -> None:
    configured = dataclasses.replace(settings, redis_url=own_redis.url)
    with running_reader(configured, tmp_path / "reader.log") as (base, reader):
        assert http_json(f"{base}/recommendations/someone?k=5")[0] == 200

        own_redis.kill()
        status, body = http_json(f"{base}/recommendations/someone?k=5")
        assert status == 503 and body["status"] == 503 and "Redis" in body["error"]
        assert http_json(f"{base}/healthz")[0] == 503

        own_redis.start()
        wait_until(
            lambda: http_json(f"{base}/recommendations/someone?k=5")[0] == 200,
            30,
            "the reader to serve again once Redis is back",
        )
        assert reader.poll() is None
