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
from redis.cluster import RedisCluster

from freshrec.devenv import local_services
from freshrec.devenv.local_services import (
    REDIS_PERSISTENCE,
    ServiceError,
    down,
    resolve,
    status,
    up,
    wait_for_redis,
)
from freshrec.settings import Settings
from tests.support import OwnRedis

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
        options = dict(zip(REDIS_PERSISTENCE[::2], REDIS_PERSISTENCE[1::2], strict=True))
        percentage = options["--auto-aof-rewrite-percentage"]
        assert client.config_get("auto-aof-rewrite-percentage") == {
            "auto-aof-rewrite-percentage": percentage
        }
        min_size = options["--auto-aof-rewrite-min-size"].removesuffix("mb")
        assert client.config_get("auto-aof-rewrite-min-size") == {
            "auto-aof-rewrite-min-size": str(int(min_size) * 2**20)
        }
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


# --- a local Redis Cluster ---------------------------------------------------------------------
def _cluster(settings: Settings, persist: bool = True) -> Settings:
    """Settings asking for a local Redis Cluster; Kafka is given (never reached), so `up`
    starts only the cluster."""
    return dataclasses.replace(
        settings, kafka_bootstrap="127.0.0.1:1", redis_cluster=True, redis_persist=persist
    )


def _write_keys(url: str, prefix: str, n: int = 200) -> None:
    client = RedisCluster.from_url(url)
    try:
        for i in range(n):
            client.set(f"{prefix}:k{i}", i)
    finally:
        client.close()


def _read_keys(url: str, prefix: str, n: int = 200) -> tuple[list[bytes | None], list[int]]:
    """The values of the keys `_write_keys` wrote, and how many keys each primary holds."""
    client = RedisCluster.from_url(url)
    try:
        values = [client.get(f"{prefix}:k{i}") for i in range(n)]
        return values, [node.redis_connection.dbsize() for node in client.get_primaries()]
    finally:
        client.close()


def test_a_local_cluster_spreads_every_slot_and_key_over_three_primaries(
    settings: Settings, tmp_path: Path
) -> None:
    wanted = dataclasses.replace(settings, redis_cluster=True)
    children = _children()
    endpoints, stop = resolve(wanted, tmp_path, services=("redis",))
    try:
        started = [_processes()[pid][1] for pid in _children() - children]
        assert len(started) == 3 and all("redis-server" in c for c in started), started
        client = RedisCluster.from_url(endpoints.redis_url)
        assert len(client.get_primaries()) == 3
        slots = client.cluster_slots(target_nodes=RedisCluster.RANDOM)
        assert len({info["primary"] for info in slots.values()}) == 3
        assert sorted(s for start, end in slots for s in range(start, end + 1)) == list(
            range(16384)
        )
        client.close()

        _write_keys(endpoints.redis_url, "fr:spread")
        values, per_node = _read_keys(endpoints.redis_url, "fr:spread")
        assert values == [str(i).encode() for i in range(200)]
        assert sum(per_node) == 200 and all(n > 0 for n in per_node), per_node
    finally:
        stop()
    _wait_until(lambda: _children() == children, 10, "the cluster's three nodes to stop")


def test_down_stops_every_node_and_up_brings_the_cluster_back_with_its_keys(
    settings: Settings, tmp_path: Path
) -> None:
    wanted = _cluster(settings, persist=True)
    try:
        first = up(wanted, tmp_path)
        assert first.source == "local"
        running = status(wanted, tmp_path, ("redis",))["redis"]
        assert running["alive"] and running["answering"], running
        pids = [node["pid"] for node in running["nodes"]]
        assert len(set(pids)) == 3 and all(Path(f"/proc/{pid}").exists() for pid in pids)
        _write_keys(first.redis_url, "fr:kept")

        stopped = down(wanted, tmp_path)
        assert len(stopped) == 1 and "cluster" in stopped[0], stopped
        for pid in pids:
            _wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 10, f"pid {pid} gone")
        after = status(wanted, tmp_path, ("redis",))["redis"]
        assert after["alive"] is False and after["answering"] is False, after

        second = up(wanted, tmp_path)
        assert second.redis_url == first.redis_url  # the recorded ports, so the nodes rejoin
        back = status(wanted, tmp_path, ("redis",))["redis"]
        assert all(node["answering"] for node in back["nodes"]), back  # cluster_state:ok
        assert not set(pids) & {node["pid"] for node in back["nodes"]}
        values, per_node = _read_keys(second.redis_url, "fr:kept")
        assert values == [str(i).encode() for i in range(200)]
        assert all(n > 0 for n in per_node), per_node
    finally:
        down(wanted, tmp_path)


def test_a_cluster_without_persistence_comes_back_empty(settings: Settings, tmp_path: Path) -> None:
    wanted = _cluster(settings, persist=False)
    try:
        first = up(wanted, tmp_path)
        _write_keys(first.redis_url, "fr:gone", 10)
        down(wanted, tmp_path)
        second = up(wanted, tmp_path)
        values, per_node = _read_keys(second.redis_url, "fr:gone", 10)
        assert values == [None] * 10 and per_node == [0, 0, 0]
    finally:
        down(wanted, tmp_path)


def test_a_running_single_redis_is_not_taken_for_a_cluster(
    settings: Settings, tmp_path: Path
) -> None:
    single = dataclasses.replace(_cluster(settings), redis_cluster=False)
    try:
        up(single, tmp_path)
        with pytest.raises(ServiceError, match="FRESHREC_REDIS_CLUSTER asks for a cluster"):
            up(_cluster(settings), tmp_path)
    finally:
        assert len(down(single, tmp_path)) == 1


def test_waiting_for_a_cluster_on_a_single_server_fails_at_once(own_redis: OwnRedis) -> None:
    started = time.monotonic()
    with pytest.raises(ServiceError, match="not a cluster node"):
        wait_for_redis(own_redis.url, 30, cluster=True)
    assert time.monotonic() - started < 5
    wait_for_redis(own_redis.url, 5)  # a plain PING is enough without a cluster


def test_cluster_settings_name_a_cluster(cluster_settings: Settings) -> None:
    assert cluster_settings.redis_cluster
    client = RedisCluster.from_url(cluster_settings.redis_url)
    try:
        assert len(client.get_primaries()) == 3
        client.set(f"{cluster_settings.key_prefix}:fixture", "v")  # the fixture deletes it
    finally:
        client.close()
