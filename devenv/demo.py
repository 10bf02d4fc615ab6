"""``freshrec demo``: the whole system on a synthetic stream, end to end, on this machine.

It starts what is not configured (Kafka, Redis), a worker and a reader as separate processes,
replays a synthetic stream while showing throughput and lag, then sends new events for a few
users and shows their lists before and after, timing how long the change takes to be served.
Everything it started is stopped and everything it wrote is deleted at the end.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import redis

from freshrec.connections import kafka_config, redis_sync_client
from freshrec.devenv.isolated_run import isolated_run
from freshrec.devenv.processes import Children, free_port, http_json
from freshrec.evaluation.synth import SynthConfig, generate
from freshrec.progress import Progress
from freshrec.settings import Settings, mask_url
from freshrec.store.keys import Keys
from freshrec.streams.events import encode_events
from freshrec.streams.producer import EventProducer

DEMO_USERS = 3


class Demo(Children):
    """The demo's worker and reader, and what it says."""

    def __init__(self, settings: Settings, quiet: bool) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="freshrec-demo-")), settings)
        self.quiet = quiet

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text, flush=True)


def run_demo(base: Settings, events: int = 60_000, rate: float = 0.0, quiet: bool = False) -> dict:
    with isolated_run(
        base, "demo", serve_port=free_port(), worker_metrics_port=0, publish_interval_s=0.2
    ) as settings:
        demo = Demo(settings, quiet)
        store = redis_sync_client(settings)
        try:
            return _run(demo, settings, store, events, rate)
        finally:
            demo.stop()
            store.close()


def _run(demo: Demo, settings: Settings, store: redis.Redis, events: int, rate: float) -> dict:
    say = demo.say
    say(f"Kafka {settings.kafka_bootstrap} and Redis {mask_url(settings.redis_url)}")
    worker = demo.start("worker", ["worker", "--loglevel", "warning"])
    demo.start("reader", ["serve"])
    base_url = f"http://{settings.serve_host}:{settings.serve_port}"
    demo.wait(lambda: http_json(base_url + "/healthz")[0] == 200, 60, "the reader")
    say(f"worker pid {worker.pid}, reader {base_url}; logs in {demo.logs}")

    stream = generate(SynthConfig(events=events, users=2000, items=1000, seed=7))
    say(f"synthetic stream: {len(stream.events):,} events, 2,000 users, 1,000 items")
    stats_key = Keys(settings.key_prefix).worker_stats

    def applied() -> int:
        return int(store.hget(stats_key, "events") or 0)

    # --- replay with live progress ------------------------------------------------------------
    bad = [b"{oops", encode_events({"type": "like", "user_id": "u1", "item_id": "i1", "ts": 1.7e9})]
    producer = EventProducer(
        settings.kafka_bootstrap,
        settings.events_topic,
        events_per_message=100,
        config=kafka_config(settings),
    )
    progress = Progress(len(stream.events), "replay", stream=None if not demo.quiet else _Null())
    started = time.monotonic()
    for n, event in enumerate(stream.events, start=1):
        producer.send(event)
        if n % 500 == 0 or n == len(stream.events):
            progress.advance(n - progress.count, note=f"applied {applied():,}")
            ahead = n / rate - (time.monotonic() - started) if rate > 0 else 0
            if ahead > 0:
                time.sleep(ahead)
    for payload in bad:
        producer.send_raw(payload)
    producer.flush()
    sent_s = time.monotonic() - started
    demo.wait(lambda: applied() >= len(stream.events), 300, "the worker to apply the stream")
    applied_s = time.monotonic() - started
    progress.close(note=f"applied {applied():,}")
    say(
        f"sent {len(stream.events):,} events in {sent_s:.1f} s; "
        f"all applied after {applied_s:.1f} s "
        f"({len(stream.events) / applied_s:,.0f} events/s end to end)"
    )

    # --- before and after: new events for a few users --------------------------------------------
    users = _active_users(stream.events, DEMO_USERS)
    changes, latencies = [], []
    now = max(e["ts"] for e in stream.events) + 60
    for user in users:
        before = _items(base_url, user)
        target = _popular_unseen(store, settings, user, before)
        new_events = [
            {"type": "purchase", "user_id": user, "item_id": target, "ts": now},
            {"type": "click", "user_id": user, "item_id": target, "ts": now + 1},
        ]
        sent_at = time.monotonic()
        producer.send_many(new_events)
        producer.flush()
        demo.wait(
            lambda u=user, ts=now + 1: (_state(base_url, u) or 0) >= ts,
            30,
            f"the list of {user} to reflect the purchase",
        )
        latencies.append(time.monotonic() - sent_at)
        after = _items(base_url, user)
        assert target not in after, f"{target} was served to {user} after buying it"
        changes.append(
            {"user": user, "event": f"purchase of {target}", "before": before, "after": after}
        )
        ms = 1000 * latencies[-1]
        say(f"\n{user} purchases {target}  (served {ms:.0f} ms later)")
        say(f"  before: {' '.join(before)}")
        say(f"  after:  {' '.join(after)}")
        new = [i for i in after if i not in before]
        say(f"  new:    {' '.join(new) or '(reordered)'}")

    published = _topic_size(settings, settings.recommendations_topic)
    demo.wait(lambda: _topic_size(settings, settings.dlq_topic) >= len(bad), 30, "the DLQ")
    dead = _topic_size(settings, settings.dlq_topic)
    summary = {
        "ok": True,
        "events": len(stream.events),
        "replay_seconds": round(sent_s, 2),
        "applied_seconds": round(applied_s, 2),
        "events_per_s_end_to_end": round(len(stream.events) / applied_s, 1),
        "event_to_served_ms_median": round(1000 * statistics.median(latencies), 1),
        "event_to_served_ms_max": round(1000 * max(latencies), 1),
        "recommendation_messages": published,
        "dead_letters": dead,
        "changes": changes,
    }
    say(
        "\nsummary: {events:,} events, {events_per_s_end_to_end:,.0f} events/s end to end; "
        "new events served after {event_to_served_ms_median:.0f} ms (median, max "
        "{event_to_served_ms_max:.0f} ms); {recommendation_messages:,} lists published to "
        "Kafka; {dead_letters} malformed messages in the dead-letter topic.".format(**summary)
    )
    return summary


class _Null:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _state(base_url: str, user: str) -> float | None:
    """Event time of the newest event the served list reflects."""
    return http_json(f"{base_url}/recommendations/{user}?k=1")[1]["latest_event_ts"]


def _items(base_url: str, user: str) -> list[str]:
    status, body = http_json(f"{base_url}/recommendations/{user}?k=10")
    if status != 200:
        raise RuntimeError(f"reader answered {status}: {body}")
    return [i["item_id"] for i in body["items"]]


def _active_users(events: list[dict], n: int) -> list[str]:
    counts: dict[str, int] = {}
    for event in events:
        counts[event["user_id"]] = counts.get(event["user_id"], 0) + 1
    ranked = sorted(counts, key=lambda u: -counts[u])
    return ranked[len(ranked) // 4 : len(ranked) // 4 + n]  # ordinary users, not the heaviest


def _popular_unseen(store: redis.Redis, settings: Settings, user: str, current: list[str]) -> str:
    """A well-connected item the user has not seen and is not being shown right now."""
    seen = {m.decode() for m in store.zrange(Keys(settings.key_prefix).history(user), 0, -1)}
    for member in store.zrevrange(Keys(settings.key_prefix).occurrences, 0, 200):
        item = member.decode()
        if item not in seen and item not in current:
            return item
    raise RuntimeError(f"no unseen item for {user}")


def _topic_size(settings: Settings, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        kafka_config(settings, **{"group.id": "freshrec-demo-size", "log_level": 3})
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        total = 0
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
        return total
    finally:
        consumer.close()
