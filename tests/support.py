"""Test plumbing: wait on conditions with deadlines, run freshrec processes, read topics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from freshrec.settings import Settings

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, poll_s: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # a condition may fail while a service is starting
            last_error = exc
        time.sleep(poll_s)
    raise AssertionError(
        f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error})"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def freshrec_process(command: list[str], settings: Settings, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, **settings.environ()}
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "freshrec.cli", *command],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_process(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def group_is_consuming(bootstrap: str, group: str) -> bool:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    description = admin.describe_consumer_groups([group])[group].result(timeout=5)
    return str(description.state).endswith("STABLE") and any(
        m.assignment and m.assignment.topic_partitions for m in description.members
    )


def http_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


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
