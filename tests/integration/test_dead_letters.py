"""Malformed messages go to the dead-letter topic with a reason; valid ones are learned."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

from freshrec.connections import kafka_config
from freshrec.settings import Settings
from freshrec.store.keys import Keys
from freshrec.streams.producer import EventProducer
from tests.support import TopicReader, freshrec_process, stop_process, wait_until

pytestmark = pytest.mark.integration

TS = time.time() - 60


def _valid(n: int) -> bytes:
    return json.dumps(
        {"type": "click", "user_id": f"ok-{n}", "item_id": f"item-{n}", "ts": TS}
    ).encode()


BAD = {
    b"{not json": "not valid JSON",
    json.dumps({"type": "click", "user_id": "u", "ts": TS}).encode(): "missing field 'item_id'",
    json.dumps(
        {"type": "click", "user_id": 7, "item_id": "i", "ts": TS}
    ).encode(): "'user_id' must be a string",
    json.dumps(
        {"type": "like", "user_id": "u", "item_id": "i", "ts": TS}
    ).encode(): "unknown type 'like'",
    b'{"type": "rating", "user_id": "u", "item_id": "i", "value": NaN, "ts": 1.7e9}': "NaN",
    json.dumps(
        {"type": "rating", "user_id": "u", "item_id": "i", "value": 9, "ts": TS}
    ).encode(): "outside the scale",
    json.dumps(
        {"type": "view", "user_id": "u", "item_id": "i", "ts": 12.0}
    ).encode(): "plausible unix time",
}


def test_each_bad_message_lands_in_the_dlq_and_every_valid_one_is_applied(
    settings: Settings, worker, redis_client
) -> None:
    sent_bad = list(BAD)
    with EventProducer(settings.kafka_bootstrap, settings.events_topic) as producer:
        for n, bad in enumerate(sent_bad):
            producer.send_raw(_valid(n), key=f"ok-{n}".encode())
            producer.send_raw(bad, key=b"u")
        # One array: a valid event next to an invalid one; only the invalid one is rejected.
        mixed = [json.loads(_valid(100)), {"type": "click", "user_id": "u", "ts": TS}]
        producer.send_raw(json.dumps(mixed).encode(), key=b"ok-100")

    dlq = TopicReader(settings.kafka_bootstrap, settings.dlq_topic)
    try:
        messages = wait_until(
            lambda: (m := dlq.poll()) and len(m) >= len(sent_bad) + 1 and m,
            30,
            "every bad message on the DLQ",
        )
        by_value = {m.value(): dict(m.headers())["freshrec-reason"].decode() for m in messages}
        for bad, expected in BAD.items():
            assert bad in by_value, f"{bad!r} missing from the DLQ"
            assert expected in by_value[bad], (bad, by_value[bad])
        mixed_reason = by_value[json.dumps(mixed).encode()]
        assert "event [1]" in mixed_reason and "missing field 'item_id'" in mixed_reason
        assert all(
            dict(m.headers())["freshrec-source"].startswith(settings.events_topic.encode())
            for m in messages
        )
    finally:
        dlq.close()

    for n in [*range(len(sent_bad)), 100]:
        wait_until(
            lambda n=n: redis_client.zscore(
                Keys(settings.key_prefix).history(f"ok-{n}"), f"item-{n}"
            ),
            30,
            f"valid event {n} to be applied",
        )
    assert (
        redis_client.exists(Keys(settings.key_prefix).history("u")) == 0
    )  # nothing of the bad user
    assert worker.poll() is None, "the worker stopped"


def _rating(value: str, user: str = "poison") -> str:
    return f'{{"type":"rating","user_id":"{user}","item_id":"i","value":{value},"ts":{TS}}}'


# Messages that once crashed the agent (OverflowError, RecursionError) or multiplied on the DLQ
# (one dead letter per bad element, each with the whole message), with the reason each must give
# and how many events each rejects.
POISON = {
    _rating("9" * 400).encode(): ("'value' must be a finite number", 1),
    b"[" * 100_000: ("nested too deeply", 1),
    b"[" + b",".join([b"{}"] * 2000) + b"]": ("... and 1990 more", 2000),
    json.dumps(
        [{"type": "click", "user_id": "poison", "ts": TS, "n": n} for n in range(20)]
    ).encode(): ("unknown field(s)", 20),
}


def _impression(item: str, variant: str = "control") -> str:
    return (
        f'{{"request_id":"r","user_id":"shown-user","variant":"{variant}","ts":{TS},'
        f'"items":[{item}]}}'
    )


POISON_IMPRESSIONS = {
    _impression('{"item_id":"i","position":1e999}').encode(): "position must be an integer",
    _impression('{"item_id":"i","position":0,"features":{"mf":NaN}}').encode(): "NaN",
    _impression('{"item_id":"i","position":0}', "v" * 100_000).encode(): "'variant' must be",
}


def test_each_poison_message_is_one_dead_letter_and_the_worker_keeps_learning(
    settings: Settings, worker, redis_client
) -> None:
    """Poison among valid messages: exactly one dead letter each, and whatever comes after them
    (on the same partition and others) is still learned: the agent did not crash."""
    # A message whose valid events sit next to a poison one: one dead letter, valid ones learned.
    mixed = f"[{_valid(300).decode()},{_rating('9' * 400)},{_valid(301).decode()}]".encode()
    poison = {**POISON, mixed: ("event [1]: 'value' must be a finite number", 1)}
    marker = json.dumps({"type": "click", "user_id": "poison", "ts": TS}).encode()
    with EventProducer(settings.kafka_bootstrap, settings.events_topic) as producer:
        for n, bad in enumerate(poison):
            producer.send_raw(_valid(200 + n), key=f"ok-{200 + n}".encode())
            producer.send_raw(bad, key=b"poison")
        # Sent last on the poison partition: once its dead letter arrives, all earlier ones have
        # (the worker sends them in order, with the same key, so to the same DLQ partition).
        producer.send_raw(marker, key=b"poison")
        for n in range(250, 255):  # valid events after the poison, on the same partition too
            producer.send_raw(_valid(n), key=b"poison")
    valid_impression = _impression('{"item_id":"seen","position":1,"features":{"mf":0.5}}')
    impression_marker = b'{"not an impression"}'
    with EventProducer(settings.kafka_bootstrap, settings.impressions_topic) as producer:
        for bad in POISON_IMPRESSIONS:
            producer.send_raw(bad, key=b"poison")
        producer.send_raw(impression_marker, key=b"poison")
        producer.send_raw(valid_impression.encode(), key=b"poison")  # after the poison

    dlq = TopicReader(settings.kafka_bootstrap, settings.dlq_topic)
    try:
        messages = wait_until(
            lambda: (
                (m := dlq.poll())
                and {marker, impression_marker} <= {x.value() for x in m}
                and list(m)
            ),
            60,
            "the markers sent after the poison messages on the DLQ",
        )
        values = [m.value() for m in dlq.poll()]
        headers = {m.value(): dict(m.headers()) for m in messages}
        for bad, (expected, rejected) in poison.items():
            assert values.count(bad) == 1, (bad[:80], values.count(bad))
            reason = headers[bad]["freshrec-reason"].decode()
            assert expected in reason, (bad[:80], reason)
            assert len(headers[bad]["freshrec-reason"]) <= 4096
            assert headers[bad]["freshrec-rejected"] == str(rejected).encode()
        for bad, expected in POISON_IMPRESSIONS.items():
            assert values.count(bad) == 1, (bad[:80], values.count(bad))
            assert expected in headers[bad]["freshrec-reason"].decode()
            assert headers[bad]["freshrec-source"].startswith(settings.impressions_topic.encode())
        assert len(values) == len(poison) + 1 + len(POISON_IMPRESSIONS) + 1
    finally:
        dlq.close()

    for n in [*range(200, 200 + len(poison)), 300, 301]:
        wait_until(
            lambda n=n: redis_client.zscore(
                Keys(settings.key_prefix).history(f"ok-{n}"), f"item-{n}"
            ),
            30,
            f"valid event {n} to be applied",
        )
    for n in range(250, 255):
        wait_until(
            lambda n=n: redis_client.zscore(
                Keys(settings.key_prefix).history(f"ok-{n}"), f"item-{n}"
            ),
            30,
            f"valid event {n}, sent after the poison on its partition, to be applied",
        )
    wait_until(
        lambda: redis_client.hget(Keys(settings.key_prefix).shown("shown-user"), "seen"),
        30,
        "the valid impression sent after the poison ones to be remembered",
    )
    assert redis_client.exists(Keys(settings.key_prefix).history("poison")) == 0
    assert worker.poll() is None, "the worker stopped"


def test_a_message_without_key_or_value_and_one_with_a_huge_key_are_dead_letters(
    settings: Settings, worker, redis_client
) -> None:
    """Kafka's producer refuses a record with neither key nor value: its dead letter goes with
    an empty value, and the valid events around it are learned (the agent once died on it,
    losing its batch). A key is cut to its first 4 KiB, so that a dead letter of a message
    near the size limit fits with its headers."""
    huge_key = b"k" * 100_000
    with EventProducer(settings.kafka_bootstrap, settings.events_topic) as producer:
        producer.send_raw(_valid(400), key=b"ok-400")
        producer.send_raw(None, key=None)  # type: ignore[arg-type]
        producer.send_raw(b"{not json", key=huge_key)
        producer.send_raw(_valid(401), key=b"ok-401")

    dlq = TopicReader(settings.kafka_bootstrap, settings.dlq_topic)
    try:
        messages = wait_until(
            lambda: (m := dlq.poll()) and len(m) >= 2 and m, 30, "both dead letters"
        )
        by_reason = {dict(m.headers())["freshrec-reason"].decode(): m for m in messages}
        (empty,) = [m for reason, m in by_reason.items() if "empty message" in reason]
        assert empty.key() is None and empty.value() == b""
        (cut,) = [m for reason, m in by_reason.items() if "not valid JSON" in reason]
        assert cut.key() == huge_key[:4096] and cut.value() == b"{not json"
        assert dict(cut.headers())["freshrec-original-key-bytes"] == b"100000"
    finally:
        dlq.close()
    for n in (400, 401):
        wait_until(
            lambda n=n: redis_client.zscore(
                Keys(settings.key_prefix).history(f"ok-{n}"), f"item-{n}"
            ),
            30,
            f"valid event {n} to be applied",
        )
    assert worker.poll() is None, "the worker stopped"


def test_a_dead_letter_kafka_refuses_stops_the_worker_before_its_batch_is_acknowledged(
    settings: Settings, worker, redis_client, tmp_path: Path
) -> None:
    """The dead-letter topic refuses every record (over its 1-byte limit): the worker exits
    with status 70 instead of acknowledging the batch. Once the topic takes records again, a
    new worker sends the letter again, and the valid event beside it is learned once."""
    admin = AdminClient(kafka_config(settings))

    def limit(op: AlterConfigOpType, value: str = "") -> None:
        entry = ConfigEntry("max.message.bytes", value, incremental_operation=op)
        dlq = ConfigResource(
            ConfigResource.Type.TOPIC, settings.dlq_topic, incremental_configs=[entry]
        )
        for future in admin.incremental_alter_configs([dlq]).values():
            future.result(30)

    limit(AlterConfigOpType.SET, "1")
    try:
        with EventProducer(settings.kafka_bootstrap, settings.events_topic) as producer:
            producer.send_raw(_valid(500), key=b"refused")
            producer.send_raw(b"{not json", key=b"refused")
        assert worker.wait(60) == 70
        assert "were not delivered" in (tmp_path / "worker.log").read_text(errors="replace")
    finally:
        limit(AlterConfigOpType.DELETE)
    again = freshrec_process(["worker", "--loglevel", "warning"], settings, tmp_path / "again.log")
    dlq = TopicReader(settings.kafka_bootstrap, settings.dlq_topic)
    try:
        (letter,) = wait_until(lambda: dlq.poll() or None, 60, "the dead letter, sent again")
        assert letter.value() == b"{not json"
        history = Keys(settings.key_prefix).history("ok-500")
        wait_until(lambda: redis_client.zscore(history, "item-500"), 30, "the valid event")
        assert redis_client.hget(f"{settings.key_prefix}:stats:worker", "events") == b"1"
    finally:
        dlq.close()
        stop_process(again)
