"""Redis memory per user and per item: what sizing a deployment needs.

A stream (synthetic by default, or a dataset or file) is learned into a fresh key prefix by the
workers' own `BatchUpdater`, in batches as a worker takes them; then every key under the prefix
is measured with ``MEMORY USAGE`` (exact: every element sampled) and put in one of three
groups:

- **per user**: the user's factors (``mf:u:*``) and history (``hist:*``);
- **per item**: the item's factors (``mf:i:*``) and neighbour list (``cf:*``), and its share of
  the sorted sets and hashes that hold one member per item (occurrences, popularity,
  impressions, clicks, first seen, updated, active, retired), divided among the items by their
  number of members;
- **publication queue**: the users waiting for their list to be published (``dirty``), one
  member each until a reader pops them; with no reader here it holds every user, so it is
  reported apart, per waiting user;
- **shared**: what does not grow with either (the rating mean, watermarks, clocks, the
  rankers' state).

The per-user and per-item figures depend on how much each has seen: a user's history grows to
``FRESHREC_HISTORY_CAP`` items, a neighbour list to ``FRESHREC_NEIGHBOURS_CAP``, so the report
gives the mean history length and neighbour-list length beside them. Impressions the reader
logs (``shown:*``) come from serving, not from events, and are not in this replay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from freshrec.connections import redis_client, redis_sync_client
from freshrec.devenv.isolated_run import isolated_run
from freshrec.evaluation.fetch import DATASETS, ensure_dataset
from freshrec.evaluation.prequential import load_events
from freshrec.evaluation.synth import SynthConfig, generate
from freshrec.progress import Say
from freshrec.settings import Settings
from freshrec.store.batch_update import BatchUpdater
from freshrec.store.keys import Keys
from freshrec.streams.events import Event, EventValidator

BATCH_EVENTS = 1_000
"""Events per learned batch: a worker's batch under load."""


def stream_events(source: str | None, settings: Settings, users: int, items: int,
                  events: int) -> tuple[list[Event], str]:  # fmt: skip
    """The events to learn and a description of them: a dataset name or file, or synthetic."""
    if source is None:
        stream = generate(SynthConfig(users=users, items=items, events=events))
        validator = EventValidator(settings)
        parsed = [validator.parse_one(raw) for raw in stream.events]
        return parsed, f"synthetic ({users:,} users, {items:,} items)"
    path = ensure_dataset(source, settings.home) if source in DATASETS else Path(source)
    loaded, _, _ = load_events(path, settings, limit=events)
    return loaded, source


def classify(keys: Keys, key: str, item_sets: set[str]) -> str:
    """``user``, ``item``, ``per-item set`` (one of ``item_sets``), ``queue`` or ``shared``,
    by the key's name."""
    tag = key[len(keys.prefix) + 1 :].partition(":")[2]  # after the family: {u:..} or {i:..}
    if tag.startswith("{u:"):
        return "user"
    if tag.startswith("{i:"):
        return "item"
    if key in item_sets:
        return "per-item set"
    if key == keys.dirty_users:
        return "queue"
    return "shared"


def per_item_sets(keys: Keys) -> set[str]:
    """The sorted sets and hashes holding one member per item."""
    return {
        keys.occurrences,
        keys.popularity,
        keys.impressions,
        keys.clicks,
        keys.item_first_seen,
        keys.item_ratings,
        keys.updated_items,
        keys.relisted_items,
        keys.active_items,
        keys.retired_items,
    }


def measure_keys(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Bytes and key counts by group, with each per-item set's members, for ``keys.prefix``."""
    names = [k.decode() for k in client.scan_iter(match=f"{keys.prefix}:*", count=5000)]
    groups: dict[str, dict[str, int]] = {}
    members: dict[str, int] = {}
    users = sum(1 for n in names if n.startswith(f"{keys.prefix}:mf:{{u:"))
    items = sum(1 for n in names if n.startswith(f"{keys.prefix}:mf:{{i:"))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.memory_usage(name, samples=0)
    sizes = pipe.execute()
    item_sets = per_item_sets(keys)
    for name, size in zip(names, sizes, strict=True):
        group = groups.setdefault(classify(keys, name, item_sets), {"keys": 0, "bytes": 0})
        group["keys"] += 1
        group["bytes"] += int(size or 0)
    for name in (item_sets | {keys.dirty_users}) & set(names):
        kind = client.type(name).decode()
        members[name] = int(client.zcard(name) if kind == "zset" else client.hlen(name))
    return {
        "groups": groups,
        "members": members,
        "users": users,
        "items": items,
        "queue_key": keys.dirty_users,
    }


def run_memory_bench(
    base: Settings,
    source: str | None = None,
    users: int = 10_000,
    items: int = 2_000,
    events: int = 200_000,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Learn the stream into a prefix of its own, measure its keys, erase them."""
    say = Say(show_progress)
    stream, about = stream_events(source, base, users, items, events)
    with isolated_run(base, "bench-memory", kafka=False) as settings:
        keys = Keys(settings.key_prefix)
        client = redis_sync_client(settings)
        try:
            used_before = int(client.info("memory")["used_memory"])
            redis_before, cpu_before = redis_cpu_seconds(client), time.process_time()
            started = time.perf_counter()
            asyncio.run(_learn(settings, keys, stream, say))
            learn_s = time.perf_counter() - started
            cpu = time.process_time() - cpu_before
            redis_after = redis_cpu_seconds(client)
            redis_cpu = (
                None if redis_before is None or redis_after is None else redis_after - redis_before
            )
            used_after = int(client.info("memory")["used_memory"])
            say("bench memory: measuring every key")
            measured = measure_keys(client, keys)
            histories = _mean_length(client, keys, "hist:*")
            neighbours = _mean_length(client, keys, "cf:*")
        finally:
            client.close()
    result = summarise(measured, about, len(stream), learn_s, used_after - used_before,
                       histories, neighbours)  # fmt: skip
    per_event = 1e6 / max(len(stream), 1)
    result["learn_cpu_us_per_event"] = round(cpu * per_event)
    result["redis_cpu_us_per_event"] = None if redis_cpu is None else round(redis_cpu * per_event)
    return result


def redis_cpu_seconds(client: redis.Redis) -> float | None:
    """The server's main-thread CPU seconds, user and system (what runs commands and scripts);
    None where it does not report them (before Redis 6.2)."""
    info = client.info("cpu")
    fields = ("used_cpu_user_main_thread", "used_cpu_sys_main_thread")
    if not all(field in info for field in fields):
        return None
    return sum(float(info[field]) for field in fields)


async def _learn(settings: Settings, keys: Keys, stream: Sequence[Event], say: Say) -> None:
    client = redis_client(settings)
    try:
        updater = BatchUpdater(client, keys, settings.model_config())
        for start in range(0, len(stream), BATCH_EVENTS):
            await updater.apply(stream[start : start + BATCH_EVENTS])
            if start % (20 * BATCH_EVENTS) == 0:
                say(f"bench memory: learned {start:,} of {len(stream):,} events")
    finally:
        await client.aclose()


def _mean_length(client: redis.Redis, keys: Keys, pattern: str) -> float:
    """The mean number of members of the sorted sets named by ``pattern``."""
    names = list(client.scan_iter(match=f"{keys.prefix}:{pattern}", count=5000))
    if not names:
        return 0.0
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.zcard(name)
    return sum(pipe.execute()) / len(names)


def summarise(measured: dict[str, Any], about: str, events: int, learn_s: float,
              used_delta: int, histories: float, neighbours: float) -> dict[str, Any]:  # fmt: skip
    """Bytes per user and per item from the grouped key sizes."""
    groups = measured["groups"]
    users, items = measured["users"], measured["items"]
    user_bytes = groups.get("user", {}).get("bytes", 0)
    item_bytes = groups.get("item", {}).get("bytes", 0)
    set_bytes = groups.get("per-item set", {}).get("bytes", 0)
    shared_bytes = groups.get("shared", {}).get("bytes", 0)
    queue_bytes = groups.get("queue", {}).get("bytes", 0)
    waiting = measured["members"].get(measured["queue_key"], 0)
    return {
        "stream": about,
        "events": events,
        "users": users,
        "items": items,
        "learn_s": round(learn_s, 1),
        "bytes_per_user": round(user_bytes / users) if users else None,
        "bytes_per_item": round((item_bytes + set_bytes) / items) if items else None,
        "bytes_per_item_in_sets": round(set_bytes / items) if items else None,
        "bytes_per_waiting_user": round(queue_bytes / waiting) if waiting else None,
        "shared_bytes": shared_bytes,
        "keys_bytes": user_bytes + item_bytes + set_bytes + queue_bytes + shared_bytes,
        "used_memory_delta": used_delta,
        "mean_history": round(histories, 1),
        "mean_neighbours": round(neighbours, 1),
        "groups": groups,
        "members": measured["members"],
    }


def _micros(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,} µs"


def format_memory(result: dict[str, Any]) -> str:
    mib = 1024 * 1024
    return "\n".join(
        [
            f"Redis memory: {result['events']:,} events of {result['stream']} learned in "
            f"{result['learn_s']} s ({result['users']:,} users, {result['items']:,} items)",
            f"  learning  {result['learn_cpu_us_per_event']:>9,} µs of this process's CPU and "
            f"{_micros(result['redis_cpu_us_per_event'])} of Redis's per event (Redis's with "
            "whatever else it served meanwhile)",
            f"  per user  {result['bytes_per_user']:>9,} bytes  "
            f"(factors and a history of {result['mean_history']} items on average)",
            f"  per item  {result['bytes_per_item']:>9,} bytes  "
            f"(factors, a neighbour list of {result['mean_neighbours']} items on average, "
            f"{result['bytes_per_item_in_sets']:,} in the per-item sets)",
            f"  queue     {result['bytes_per_waiting_user'] or 0:>9,} bytes per user waiting for "
            "their list to be published",
            f"  shared    {result['shared_bytes']:>9,} bytes",
            f"  keys in all {result['keys_bytes'] / mib:.1f} MiB; the server's used_memory grew "
            f"by {result['used_memory_delta'] / mib:.1f} MiB meanwhile (whatever else runs on it "
            "included)",
        ]
    )
