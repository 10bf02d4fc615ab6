"""Impressions and clicks close the loop through the real reader, Kafka and worker."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from streams.producer import EventProducer
from streams.settings import Settings
from tests.support import http_json, wait_until

pytestmark = pytest.mark.integration
NOW = time.time() - 3600


def test_impression_and_click_counts_match_what_was_served_and_clicked(
    settings: Settings, worker: object, reader: str, redis_client
) -> None:
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
    catalogue = len({e["item_id"] for e in events})

    def snapshot_holds_catalogue() -> bool:
        body = http_json(f"{reader}/recommendations/c1?k=5&debug=1")[1]
        served.update(i["item_id"] for i in body["items"])
        return body["debug"]["index_items"] == catalogue

    wait_until(snapshot_holds_catalogue, 30, "the reader's snapshot to hold the catalogue")
    shown_to: dict[str, list[str]] = {}
    for user in ("c1", "c2", "newcomer"):
        for _ in range(3):
            status, body = http_json(f"{reader}/recommendations/{user}?k=5")
            assert status == 200 and body["variant"] == "control" and body["request_id"]
            items = [i["item_id"] for i in body["items"]]
            served.update(items)
            shown_to.setdefault(user, items)

    def impressions_counted() -> bool:
        counts = redis_client.zmscore(f"{prefix}:imp", list(served))
        return counts == [float(served[i]) for i in served]

    wait_until(impressions_counted, 30, "every served item's impressions to be counted")
    assert float(redis_client.get(f"{prefix}:imp:total")) == sum(served.values())

    clicked = [
        ("c1", shown_to["c1"][0]),
        ("c2", shown_to["c2"][1]),
        ("newcomer", shown_to["newcomer"][0]),
    ]
    unshown = ("c1", "never-shown-item")
    with EventProducer(settings.kafka_bootstrap, settings.events_topic) as producer:
        for user, item in [*clicked, unshown]:
            producer.send({"type": "click", "user_id": user, "item_id": item, "ts": time.time()})

    def model_state() -> dict | None:
        raw = redis_client.get(f"{prefix}:ranker")
        state = json.loads(raw) if raw else None
        return state if state and state["clicks"] >= len(clicked) else None

    state = wait_until(model_state, 30, "the attributed clicks to reach the click model")
    assert state["clicks"] == len(clicked)  # the click on an unshown item is not attributed
    assert state["impressions"] == sum(served.values())
    for user, item in clicked:  # attributed once: the impression record is consumed
        assert redis_client.hget(f"{prefix}:shown:{user}", item) is None
        assert redis_client.zscore(f"{prefix}:clk", item) >= 1
