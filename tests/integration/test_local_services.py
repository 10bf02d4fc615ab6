"""Local services: `up` is idempotent, `down` leaves nothing behind, env addresses start nothing."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from freshrec.devenv import local_services
from freshrec.devenv.local_services import down, resolve, status, up
from freshrec.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def settings() -> Settings:
    """The default home, so the Kafka jars are fetched once, with no addresses from the env."""
    return dataclasses.replace(Settings.from_env(), kafka_bootstrap="", redis_url="")


def _wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] != "Z":
            found[int(entry.name)] = (int(stat[1]), cmdline)
    return found


def _mentioning(text: str) -> list[int]:
    return [pid for pid, (_, cmdline) in _processes().items() if text in cmdline]


def _children() -> set[int]:
    return {pid for pid, (ppid, _) in _processes().items() if ppid == os.getpid()}


def _kafka_round_trip(bootstrap: str) -> bytes:
    topic = f"test.local-services.{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"u1", value=b"hello")
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": topic})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                return message.value()
        raise AssertionError(f"no message consumed from {topic} within 30 s")
    finally:
        consumer.close()


def test_up_twice_then_down_leaves_no_process_behind(settings: Settings, tmp_path: Path) -> None:
    try:
        first = up(settings, tmp_path)
        pids = {s: status(settings, tmp_path)[s]["pid"] for s in ("kafka", "redis")}
        second = up(settings, tmp_path)
        assert second == first
        assert first.source == "local"
        assert {s: status(settings, tmp_path)[s]["pid"] for s in pids} == pids
        assert all(isinstance(pid, int) for pid in pids.values())

        assert _kafka_round_trip(first.kafka_bootstrap) == b"hello"
        client = redis.Redis.from_url(first.redis_url)
        client.set("freshrec:test", "v")
        assert client.get("freshrec:test") == b"v"
        client.close()
    finally:
        stopped = down(settings, tmp_path)

    assert len(stopped) == 2, stopped
    for pid in pids.values():
        _wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 10, f"pid {pid} gone")
    _wait_until(lambda: not _mentioning(str(tmp_path)), 10, f"no process mentions {tmp_path}")


def test_status_reports_running_and_stopped(settings: Settings, tmp_path: Path) -> None:
    before = status(settings, tmp_path)
    assert not before["kafka"]["alive"] and not before["redis"]["alive"]
    try:
        endpoints = up(settings, tmp_path)
        running = status(settings, tmp_path)
        assert running["kafka"]["address"] == endpoints.kafka_bootstrap
        assert running["redis"]["address"] == endpoints.redis_url
        for service in ("kafka", "redis"):
            assert running[service]["alive"] and running[service]["answering"], running
            assert running[service]["source"] == "local"
            assert Path(f"/proc/{running[service]['pid']}").exists()
    finally:
        down(settings, tmp_path)
    after = status(settings, tmp_path)
    for service in ("kafka", "redis"):
        assert after[service]["alive"] is False and after[service]["answering"] is False, after
        assert after[service]["pid"] is None


def test_down_without_up_stops_nothing(settings: Settings, tmp_path: Path) -> None:
    children = _children()
    assert down(settings, tmp_path) == []
    assert _children() == children
    assert not _mentioning(str(tmp_path))


def test_env_endpoints_are_used_without_starting_anything(
    settings: Settings, tmp_path: Path
) -> None:
    given = dataclasses.replace(
        settings, kafka_bootstrap="127.0.0.1:1", redis_url="redis://127.0.0.1:1/0"
    )
    children = _children()
    endpoints, stop = resolve(given, tmp_path)
    try:
        assert endpoints.source == "env"
        assert endpoints.kafka_bootstrap == "127.0.0.1:1"
        assert endpoints.redis_url == "redis://127.0.0.1:1/0"
        assert _children() == children
        assert not _mentioning(str(tmp_path))
    finally:
        stop()
    assert _children() == children


def test_a_restarted_local_redis_keeps_its_state(settings: Settings, tmp_path: Path) -> None:
    """Writes a key to a redis-server started as freshrec starts it, stops the server and
    starts it again in the same folder: the key is back, read from the append-only file."""
    from freshrec.devenv.local_services import _choose_ports, _start_process, _stop_record

    ports = _choose_ports([], [6390])
    record = _start_process("redis", settings, tmp_path / "redis", ports)
    try:
        client = redis.Redis.from_url(record["address"])
        client.set("freshrec:persisted", "v")
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        client.close()
        assert _stop_record(record)
        record = _start_process("redis", settings, tmp_path / "redis", ports)
        client = redis.Redis.from_url(record["address"])
        assert client.get("freshrec:persisted") == b"v"
        client.close()
        assert list((tmp_path / "redis").rglob("*.aof"))
    finally:
        _stop_record(record)


def test_a_run_on_redis_alone_starts_no_broker(settings: Settings, tmp_path: Path) -> None:
    children = _children()
    endpoints, stop = resolve(settings, tmp_path, services=("redis",))
    try:
        assert endpoints.kafka_bootstrap == settings.kafka_bootstrap  # left as given: unused
        client = redis.Redis.from_url(endpoints.redis_url)
        assert client.ping()
        client.close()
        started = [_processes()[pid][1] for pid in _children() - children]
        assert len(started) == 1 and "redis-server" in started[0], started
    finally:
        stop()
    _wait_until(lambda: _children() == children, 10, "the run's Redis to stop")


def test_a_port_taken_between_the_check_and_the_bind_is_given_up_for_another(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs starting at once can both find the usual port free; the one whose server then
    cannot bind it starts on another, instead of failing."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        monkeypatch.setattr(local_services, "_choose_ports", lambda wanted, preferred: [taken])
        endpoints, stop = resolve(settings, tmp_path, services=("redis",))
        try:
            assert f":{taken}/" not in endpoints.redis_url
            client = redis.Redis.from_url(endpoints.redis_url)
            assert client.ping()
            client.close()
        finally:
            stop()
