"""A run of freshrec that shares the services but nothing else: its own topics and keys.

The demo, the benchmarks and evaluation each work under a topic prefix and a key prefix of
their own on whatever services are configured (or started), and erase both afterwards, so they
can run beside a production deployment, or each other, without touching anyone's state.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from freshrec.connections import redis_sync_client
from freshrec.devenv import local_services
from freshrec.settings import Settings
from freshrec.streams.topics import delete_topics, ensure_topics, topic_specs


def isolated_settings(
    base: Settings, endpoints: local_services.Endpoints, name: str, **overrides: Any
) -> Settings:
    """``base`` on ``endpoints``, under prefixes unique to this run."""
    tag = f"{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return dataclasses.replace(
        base,
        kafka_bootstrap=endpoints.kafka_bootstrap,
        redis_url=endpoints.redis_url,
        topic_prefix=f"freshrec-{tag}",
        key_prefix=f"fr-{tag}",
        **overrides,
    )


def erase(settings: Settings, topics: bool = True) -> None:
    """Delete the run's topics (when it has any) and every key under its prefix."""
    if topics:
        delete_topics(settings.kafka_bootstrap, list(topic_specs(settings)), settings=settings)
    client = redis_sync_client(settings)
    try:
        doomed = list(client.scan_iter(match=f"{settings.key_prefix}:*", count=5000))
        for start in range(0, len(doomed), 5000):
            client.unlink(*doomed[start : start + 5000])
    finally:
        client.close()


@contextmanager
def isolated_run(
    base: Settings, name: str, kafka: bool = True, **overrides: Any
) -> Iterator[Settings]:
    """Services resolved (and stopped if started here), topics created, everything erased.

    ``kafka=False`` for a run that works on Redis alone (direct-mode evaluation): no broker
    is provided or started, and no topics are made.
    """
    services = local_services.SERVICES if kafka else ("redis",)
    endpoints, stop_services = local_services.resolve(base, services=services)
    settings = isolated_settings(base, endpoints, name, **overrides)
    try:
        if kafka:
            ensure_topics(settings.kafka_bootstrap, settings)
        yield settings
    finally:
        try:
            erase(settings, topics=kafka)
        finally:
            stop_services()
