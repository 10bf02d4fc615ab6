"""Test plumbing: wait on conditions with deadlines, run freshrec processes, read topics."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Consumer, TopicPartition

from freshrec.devenv.local_services import start_local, stop_local, wait_for_redis
from freshrec.devenv.processes import (
    free_port,
    group_is_consuming,
    http_json,
    start_freshrec,
    stop_processes,
    wait_for,
)
from freshrec.settings import Settings
from freshrec.store.keys import Keys

__all__ = [
    "OwnRedis",
    "OwnService",
    "TopicReader",
    "free_port",
    "freshrec_process",
    "group_is_consuming",
    "http_json",
    "running_reader",
    "stop_process",
    "wait_until",
]

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, poll_s: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline."""
    return wait_for(condition, timeout_s, what, poll_s=poll_s)


def freshrec_process(command: list[str], settings: Settings, log_path: Path) -> subprocess.Popen:
    return start_freshrec(command, settings, log_path)


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    stop_processes([proc], timeout_s)


@contextlib.contextmanager
def running_reader(settings: Settings, log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A reader process on a free port, once it answers /healthz: (base URL, process)."""
    port = free_port()
    proc = freshrec_process(["serve", "--port", str(port)], settings, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: proc.poll() is not None or http_json(base + "/healthz")[0] == 200,
            30,
            "the reader to answer /healthz",
        )
        assert proc.poll() is None, log_path.read_text()[-3000:]
        yield base, proc
    finally:
        stop_process(proc)


class TopicReader:
    """Reads a topic from the beginning, all partitions, accumulating messages."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"test-reader-{time.monotonic_ns()}",
                "enable.auto.commit": False,
                "log_level": 3,
            }
        )
        metadata = self.consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        self.messages: list[Any] = []

    def poll(self) -> list[Any]:
        while True:
            message = self.consumer.poll(0.1)
            if message is None:
                return self.messages
            if message.error() is None:
                self.messages.append(message)

    def close(self) -> None:
        self.consumer.close()


class OwnRedis:
    """A redis-server of a test's own, so the test may kill it, restart it or keep it busy."""

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


class OwnService:
    """A Kafka broker or redis-server of a test's own, run as `freshrec services up` runs the
    local ones (Redis with its append-only file), so the test may crash it and start it again
    on the same ports and data: the address the clients know comes back with the state."""

    def __init__(self, service: str, settings: Settings, workdir: Path) -> None:
        self.service, self.settings, self.workdir = service, settings, workdir
        self.ports = distinct_free_ports(2 if service == "kafka" else 1)
        self.record: dict[str, Any] | None = None

    @property
    def address(self) -> str:
        """The bootstrap (``127.0.0.1:port``) or the Redis URL."""
        port = self.ports[0]
        return f"127.0.0.1:{port}" if self.service == "kafka" else f"redis://127.0.0.1:{port}/0"

    def start(self) -> float:
        """Start it and return the monotonic time at which it answered."""
        self.record = start_local(self.service, self.settings, self.workdir, self.ports)
        return time.monotonic()

    def stop(self, hard: bool = False) -> None:
        """A clean shutdown, or with ``hard`` a crash (SIGKILL)."""
        if self.record is not None:
            stop_local(self.record, hard=hard)
            self.record = None


def distinct_free_ports(n: int) -> list[int]:
    """``n`` free ports, no two alike."""
    ports: list[int] = []
    while len(ports) < n:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def applied_events(client: Any, settings: Settings) -> int:
    """Events the workers have applied to the state (their stats hash in Redis)."""
    return int(client.hget(Keys(settings.key_prefix).worker_stats, "events") or 0)


def partition_watermarks(client: Any, settings: Settings) -> dict[int, int]:
    """Each events partition's offset watermark in Redis (absent: none applied yet)."""
    keys, topic = Keys(settings.key_prefix), settings.events_topic
    marks = client.mget([keys.watermark(f"{topic}/{p}") for p in range(settings.partitions)])
    return {p: int(m) for p, m in enumerate(marks) if m is not None}


def drop_cluster_keys(url: str, prefix: str) -> None:
    """Deletes every key under ``prefix`` from every primary of the cluster at ``url``."""
    from redis.cluster import RedisCluster

    client = RedisCluster.from_url(url)
    try:
        found = client.scan_iter(
            match=f"{prefix}:*", count=1000, target_nodes=RedisCluster.PRIMARIES
        )
        doomed = list(found)
        if doomed:
            client.unlink(*doomed)  # redis-py splits it by slot
    finally:
        client.close()
