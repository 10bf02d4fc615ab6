"""Impressions and clicks close the loop through the real reader, Kafka and worker."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from redis.asyncio import Redis

from freshrec.settings import Settings
from freshrec.store.batch_update import BatchUpdater, Origin
from freshrec.store.feedback import BatchClicks, BatchImpressions, FeedbackLearner, Shown
from freshrec.store.keys import Keys
from freshrec.streams.events import Event
from freshrec.streams.producer import EventProducer
from tests.metrics_support import metered_worker, scrape
from tests.support import free_port, http_json, wait_until

pytestmark = pytest.mark.integration
NOW = time.time() - 3600


def test_impression_and_click_counts_match_what_was_served_and_clicked(
    settings: Settings, reader: str, redis_client, tmp_path: Path
) -> None:
    metered = dataclasses.replace(settings, worker_metrics_port=free_port())
    with metered_worker(metered, tmp_path / "worker.log") as worker:
        _serve_then_click(settings, worker, reader, redis_client)


def _serve_then_click(settings: Settings, worker: str, reader: str, redis_client) -> None:
    prefix = settings.key_prefix
    events = [
        {"type": "click", "user_id": f"c{n % 9}", "item_id": f"i{(n * 7) % 61}", "ts": NOW + n}
        for n in range(300)
    ]
    with EventProducer(settings.kafka_bootstrap, settings.events_topic, 50) as producer:
        producer.send_many(events)
    wait_until(
        lambda: int(redis_client.hget(f"{prefix}:stats:worker", "events") or 0) >= len(events),
        30,
        "the catalogue to be learned",
    )
    served: Counter[str] = Counter()  # every item any request showed, waiting included
    shown_pairs: set[tuple[str, str]] = set()  # (user, item) of every list served
    catalogue = len({e["item_id"] for e in events})

    def snapshot_holds_catalogue() -> bool:
        body = http_json(f"{reader}/recommendations/c1?k=5&debug=1")[1]
        served.update(i["item_id"] for i in body["items"])
        shown_pairs.update(("c1", i["item_id"]) for i in body["items"])
        return body["debug"]["index_items"] == catalogue

    wait_until(snapshot_holds_catalogue, 30, "the reader's snapshot to hold the catalogue")
    shown_to: dict[str, list[str]] = {}
    for user in ("c1", "c2", "newcomer"):
        for _ in range(3):
            status, body = http_json(f"{reader}/recommendations/{user}?k=5")
            assert status == 200 and body["variant"] == "control" and body["request_id"]
            items = [i["item_id"] for i in body["items"]]
            served.update(items)
            shown_pairs.update((user, item) for item in items)
            shown_to.setdefault(user, items)

    clicked = [
        ("c1", shown_to["c1"][0]),
        ("c2", shown_to["c2"][1]),
        ("newcomer", shown_to["newcomer"][0]),
    ]

    def impressions_counted() -> bool:
        # The counts land with the batch; the records a click is attributed to, a step later.
        counts = redis_client.zmscore(Keys(prefix).impressions, list(served))
        recorded = (redis_client.hget(Keys(prefix).shown(u), i) for u, i in shown_pairs)
        return counts == [float(served[i]) for i in served] and None not in recorded

    wait_until(impressions_counted, 30, "every served item's impressions to be counted")
    assert float(redis_client.get(f"{prefix}:imp:total")) == sum(served.values())

    unshown = ("c1", "never-shown-item")
    with EventProducer(settings.kafka_bootstrap, settings.events_topic) as producer:
        for user, item in [*clicked, unshown]:
            # A minute after the catalogue's last event, in event time: within the window.
            producer.send({"type": "click", "user_id": user, "item_id": item, "ts": NOW + 360})

    def model_state() -> dict | None:
        raw = redis_client.hgetall(f"{prefix}:ranker:state")
        state = {k.decode(): float(v) for k, v in raw.items()}
        return state if state.get("clicks", 0) >= len(clicked) else None

    state = wait_until(model_state, 30, "the attributed clicks to reach the click model")
    assert state["clicks"] == len(clicked)  # the click on an unshown item is not attributed
    assert state["impressions"] == sum(served.values())
    for user, item in clicked:  # attributed once: the impression record is consumed
        assert redis_client.hget(Keys(prefix).shown(user), item) is None
        assert redis_client.zscore(Keys(prefix).clicks, item) >= 1
    # The served lists' hit rate over the latest 100 clicks: the catalogue's clicks came
    # before any list was served, then 3 of the 4 clicks were on served items.
    hit_rate = ("freshrec_drift_signal_mean", (("signal", "top_n_hit"),))
    wait_until(
        lambda: scrape(worker).get(hit_rate) == pytest.approx(3 / 100),
        30,
        "the hit rate of the latest 100 clicks to be exported",
    )


async def _show(
    updater: BatchUpdater,
    learner: FeedbackLearner,
    shown: list[Shown],
    origins: list[Origin] | None = None,
) -> Counter[str]:
    """Impressions as the worker takes them: remembered by their batch's write, then learned."""
    events = [Event("impression", s.user_id, s.item_id, s.ts or NOW) for s in shown]
    batch = BatchImpressions(learner, shown)
    result = await updater.apply(events, origins, writes_for=batch.writes_for)
    return learner.learn_impressions([shown[n] for n in result.applied])


async def _click(
    updater: BatchUpdater,
    learner: FeedbackLearner,
    clicks: list[tuple[str, str, float]],
    origins: list[Origin] | None = None,
) -> Counter[str]:
    """Clicks as the worker takes them: attributed by their batch's write, then learned."""
    events = [Event("click", user, item, ts) for user, item, ts in clicks]
    batch = BatchClicks(learner, events)
    result = await updater.apply(events, origins, writes_for=batch.writes_for)
    return batch.learn(result.applied)[0]


def test_workers_merge_what_they_learn_into_one_click_model(settings: Settings) -> None:
    """Two workers learn from different impressions and clicks; the shared model holds all."""
    keys = Keys(settings.key_prefix)
    rng = np.random.default_rng(5)

    def shown(user: str, n: int) -> list[Shown]:
        features = {name: float(rng.normal()) for name in ("mf", "cf", "log_popularity")}
        return [Shown(user, f"i{n}-{p}", p, "control", f"r{n}", features) for p in range(5)]

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)
        workers = [await FeedbackLearner.load(redis, keys, 600) for _ in range(2)]
        updaters = [BatchUpdater(redis, keys, settings.model_config()) for _ in range(2)]
        added = {"n:mf": 0.0, "impressions": 0.0, "clicks": 0.0}  # what each learned, summed
        for n in range(40):
            worker, updater = workers[n % 2], updaters[n % 2]
            before = worker.model.state()
            user = f"u{n}"
            await _show(updater, worker, shown(user, n))
            if n % 3 == 0:
                await _click(updater, worker, [(user, f"i{n}-0", NOW)])
            after = worker.model.state()
            for field in added:
                added[field] += after[field] - before.get(field, 0.0)
            if n % 5 == 4:  # the two sync on their own timers, interleaved with learning
                await workers[(n // 5) % 2].sync()
        for worker in (*workers, workers[0]):
            await worker.sync()
        raw = await redis.hgetall(keys.click_model_state)
        shared = {k.decode(): float(v) for k, v in raw.items()}
        assert shared["impressions"] == 200 and shared["clicks"] == 14
        assert shared["n:mf"] == pytest.approx(added["n:mf"], rel=1e-9)
        assert workers[0].model.state() == pytest.approx(workers[1].model.state(), rel=1e-12)
        await redis.aclose()

    asyncio.run(run())


def test_a_click_is_learned_at_the_position_its_impression_had(settings: Settings) -> None:
    """A positive without its position would read as position 0 and teach the ranker to
    explain clicks by position and the served scores backwards."""
    keys = Keys(settings.key_prefix)

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)
        learner = await FeedbackLearner.load(redis, keys, 600)
        updater = BatchUpdater(redis, keys, settings.model_config())
        learned: list[dict[str, float]] = []
        learner.model.learn_click = learned.append  # type: ignore[method-assign]
        features = {"mf": 0.5, "cf": 0.2}
        shown = [Shown("u1", f"i{p}", p, "control", "r1", features) for p in range(5)]
        await _show(updater, learner, shown)
        await _click(updater, learner, [("u1", "i3", NOW)])
        assert learned == [{**features, "log_position": pytest.approx(np.log1p(3))}]
        await redis.aclose()

    asyncio.run(run())


def test_the_attribution_window_is_counted_in_event_time(settings: Settings) -> None:
    """A replayed log runs far faster than it was lived: its clicks are attributed by the
    event times of impression and click, not by when the worker sees them."""
    keys = Keys(settings.key_prefix)
    shown_at = 868_000_000.0  # 1997: a replay of an old log

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)
        learner = await FeedbackLearner.load(redis, keys, 600)
        updater = BatchUpdater(redis, keys, settings.model_config())
        features = {"mf": 0.5}
        shown = [Shown(u, "i1", 0, "control", "r", features, shown_at) for u in ("early", "late")]
        await _show(updater, learner, shown)
        attributed = await _click(
            updater, learner, [("early", "i1", shown_at + 599.0), ("late", "i1", shown_at + 601.0)]
        )
        assert attributed == {"control": 1}
        await redis.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("atomic", [True, False], ids=["script", "pipelined"])
def test_a_batch_remembers_and_attributes_in_its_own_write(
    settings: Settings, atomic: bool
) -> None:
    """What a batch remembers and attributes is written with its watermarks: a worker that
    ends after the write leaves it all in Redis, and the batch redelivered to the next worker
    (a process of its own: a learner and an updater of its own) neither writes nor learns it
    again. A click repeated within its batch is attributed once."""
    keys = Keys(settings.key_prefix)
    features = {"mf": 0.5}
    shown = [Shown("u1", f"i{p}", p, "control", "r1", features, NOW) for p in range(3)]
    shown += [Shown("u2", "i0", 0, "treatment", "r2", features, NOW)]
    shown_from = [("imp/0", 7)] * 3 + [("imp/1", 4)]
    clicks = [("u1", "i1", NOW + 1), ("u1", "i1", NOW + 2), ("u2", "i0", NOW + 3)]
    clicks_from = [("ev/0", 11), ("ev/0", 12), ("ev/1", 3)]

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)

        async def worker() -> tuple[BatchUpdater, FeedbackLearner]:
            learner = await FeedbackLearner.load(redis, keys, 600)
            return BatchUpdater(redis, keys, settings.model_config(), atomic=atomic), learner

        async def remembered(user: str) -> dict[str, int]:
            raw = await redis.hgetall(keys.shown(user))
            return {item.decode(): json.loads(record)["position"] for item, record in raw.items()}

        updater, learner = await worker()
        assert await _show(updater, learner, shown, shown_from) == {"control": 3, "treatment": 1}
        assert await remembered("u1") == {"i0": 0, "i1": 1, "i2": 2}
        assert 0 < await redis.ttl(keys.shown("u1")) <= 600  # the window bounds the memory
        attributed = await _click(updater, learner, clicks, clicks_from)
        assert attributed == {"control": 1, "treatment": 1}
        assert learner.model.state()["clicks"] == 2
        assert await remembered("u1") == {"i0": 0, "i2": 2}
        assert not await redis.exists(keys.shown("u2"))

        # That worker ends; the next one is handed both batches again.
        updater, learner = await worker()
        assert await _show(updater, learner, shown, shown_from) == {}
        assert await _click(updater, learner, clicks, clicks_from) == {}
        assert learner.model.state().get("impressions", 0.0) == 0.0
        assert learner.model.state().get("clicks", 0.0) == 0.0
        assert await remembered("u1") == {"i0": 0, "i2": 2}
        await redis.aclose()

    asyncio.run(run())
