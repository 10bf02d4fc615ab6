"""Events in, fresh recommendations out: the whole path on the real broker and real Redis."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator

import pytest

from freshrec.settings import Settings
from freshrec.store.keys import Keys
from freshrec.streams.producer import EventProducer
from freshrec.streams.recommendations_consumer import RecommendationsConsumer
from tests.support import TopicReader, applied_events, drop_cluster_keys, http_json, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(params=["single", "cluster"])
def settings(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Settings]:
    """Each test on a single Redis and on a three-node Redis Cluster: worker and reader alike."""
    if request.param == "single":
        yield settings
        return
    url = request.getfixturevalue("cluster_endpoints")
    yield dataclasses.replace(settings, redis_url=url, redis_cluster=True)
    drop_cluster_keys(url, settings.key_prefix)


NOW = time.time()


def _event(user: str, item: str, kind: str = "click", offset_s: float = 0.0) -> dict:
    return {"type": kind, "user_id": user, "item_id": item, "ts": NOW - 3600 + offset_s}


def test_new_events_change_served_and_published_recommendations(
    settings: Settings, worker: object, reader: str, redis_client: object
) -> None:
    # Other users establish that "anchor" co-occurs with "pair-a" and "pair-b".
    background = []
    for n in range(6):
        user = f"crowd-{n}"
        background += [
            _event(user, "anchor", offset_s=n),
            _event(user, "pair-a", offset_s=n + 0.1),
            _event(user, "pair-b", offset_s=n + 0.2),
        ]
    background += [_event("fan", "filler", offset_s=1), _event("fan", "anchor", offset_s=2)]
    with EventProducer(settings.kafka_bootstrap, settings.events_topic, 10) as producer:
        producer.send_many(background)
    wait_until(
        lambda: redis_client.zscore(Keys(settings.key_prefix).neighbours("anchor"), "pair-a"),
        30,
        "the background co-occurrences to land",
    )
    published = TopicReader(settings.kafka_bootstrap, settings.recommendations_topic)
    try:

        def popular_head() -> list[str] | None:
            # An unknown user gets the popular head; "anchor" is the most popular item, once
            # the reader's in-memory snapshot has caught up (it refreshes every 0.5 s).
            status, body = http_json(f"{reader}/recommendations/alice?k=50")
            assert status == 200
            items = [i["item_id"] for i in body["items"]]
            return items if "anchor" in items else None

        wait_until(popular_head, 30, "the unknown user's list to show the popular head")

        # alice has seen "seen-1"; now she interacts with "anchor".
        with EventProducer(settings.kafka_bootstrap, settings.events_topic) as producer:
            producer.send(_event("alice", "seen-1", offset_s=10))
            producer.send(_event("alice", "anchor", offset_s=11))

        def served() -> dict[str, list[str]] | None:
            # Fresh once the co-occurring items arrive through alice's own history (cf).
            status, body = http_json(f"{reader}/recommendations/alice?k=50")
            channels = {i["item_id"]: i["channels"] for i in body["items"]}
            fresh = all("cf" in channels.get(item, []) for item in ("pair-a", "pair-b"))
            return channels if status == 200 and fresh else None

        items = wait_until(served, 30, "alice's list to show the items co-occurring with anchor")
        assert "anchor" not in items and "seen-1" not in items, items
        longest = http_json(f"{reader}/recommendations/alice?k=200")[1]["items"]
        assert not {"anchor", "seen-1"} & {i["item_id"] for i in longest}

        def alice_message() -> dict | None:
            # A list published after "seen-1" alone, if the two events were applied in two
            # batches, has the pair too, from trending: wait for one that had "anchor" (cf).
            for message in published.poll():
                if message.key() == b"alice":
                    body = json.loads(message.value())
                    channels = {i["item_id"]: i["channels"] for i in body["items"]}
                    if all("cf" in channels.get(item, []) for item in ("pair-a", "pair-b")):
                        return body
            return None

        body = wait_until(alice_message, 30, "a fresh list for alice on the recommendations topic")
        assert body["user_id"] == "alice"
        assert not {"anchor", "seen-1"} & {i["item_id"] for i in body["items"]}
    finally:
        published.close()


def test_similar_items_come_from_co_occurrence(
    settings: Settings, worker: object, reader: str, redis_client: object
) -> None:
    events = []
    for n in range(4):
        events += [_event(f"s{n}", "x", offset_s=n), _event(f"s{n}", "y", offset_s=n + 0.5)]
    events.append(_event("loner", "z"))
    before = applied_events(redis_client, settings)
    with EventProducer(settings.kafka_bootstrap, settings.events_topic, 5) as producer:
        producer.send_many(events)
    # Packed five to a message per partition, a user's two events may be applied in two
    # batches, after the loner's: wait for all of them, not for the items to be known.
    wait_until(
        lambda: applied_events(redis_client, settings) - before == len(events),
        30,
        "every event to be applied",
    )

    def x_pairs_with_y_alone() -> bool:
        status, body = http_json(f"{reader}/similar/x?k=5")
        assert status == 200 and [i["item_id"] for i in body["items"]] == ["y"]
        assert body["items"][0]["score"] == pytest.approx(1.0, rel=1e-6)  # identical users
        return True

    # On Redis Cluster a batch's writes reach the nodes side by side: the counter's node may
    # answer a moment before the lists' node. A wrong answer that lasts shows in the timeout.
    wait_until(x_pairs_with_y_alone, 10, "x's list to name y alone, at cosine 1")
    assert http_json(f"{reader}/similar/z")[1]["items"] == []


def test_reader_answers_bad_requests_with_json_errors(settings: Settings, reader: str) -> None:
    assert http_json(f"{reader}/recommendations/u1?k=0")[0] == 400
    status, body = http_json(f"{reader}/recommendations/u1?k=ten")
    assert status == 400 and "k must be an integer" in body["error"]
    status, body = http_json(f"{reader}/similar/never-seen")
    assert status == 404 and "never-seen" in body["error"]
    status, body = http_json(f"{reader}/predict/u1/never-seen")
    assert status == 200 and body["known_item"] is False  # mu + b_u: a rating, not an error
    assert http_json(f"{reader}/no/such/route")[0] == 404


def test_the_consumer_helper_reads_published_lists(
    settings: Settings, worker: object, reader: str
) -> None:
    consumer = RecommendationsConsumer(
        settings.kafka_bootstrap, settings.recommendations_topic, "test-helper", from_beginning=True
    )
    try:
        with EventProducer(settings.kafka_bootstrap, settings.events_topic) as producer:
            for n in range(5):
                producer.send(_event(f"d{n}", "shared", offset_s=n))
                producer.send(_event(f"d{n}", f"own-{n}", offset_s=n + 0.5))
        update = wait_until(
            lambda: (u := consumer.poll(0.2)) and u.user_id == "d4" and u,
            30,
            "a published list for d4 through the consumer helper",
        )
        assert "shared" not in update.item_ids and "own-4" not in update.item_ids
        assert update.generated_at > 0
    finally:
        consumer.close()
