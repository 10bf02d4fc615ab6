"""A Redis outage: the reader answers 503 with a JSON error, then recovers by itself."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from freshrec.devenv.local_services import wait_for_redis
from freshrec.settings import Settings
from tests.support import free_port, freshrec_process, http_json, stop_process, wait_until

pytestmark = pytest.mark.integration


class _RedisServer:
    """A redis-server of this test's own, so it can be killed and started again."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port, self.workdir = port, workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--save", "", "--appendonly", "no"],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_for_redis(self.url, 10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[_RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs a local redis-server binary to kill and restart")
    server = _RedisServer(free_port(), tmp_path)
    server.start()
    yield server
    server.kill()


def test_the_reader_answers_503_while_redis_is_down_and_recovers(
    settings: Settings, own_redis: _RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    configured = dataclasses.replace(settings, redis_url=own_redis.url)
    reader = freshrec_process(["serve", "--port", str(port)], configured, tmp_path / "reader.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: reader.poll() is not None or http_json(f"{base}/healthz")[0] == 200,
            30,
            "the reader to answer /healthz",
        )
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
    finally:
        stop_process(reader)
