"""The event schema: what is accepted, and the reason for everything that is not."""

from __future__ import annotations

import json

import pytest

from freshrec.settings import Settings
from freshrec.streams.events import EventValidator

NOW = 1_795_000_000.0


@pytest.fixture
def validator() -> EventValidator:
    return EventValidator(Settings(), clock=lambda: NOW)


def _msg(**fields: object) -> bytes:
    event = {"type": "click", "user_id": "u1", "item_id": "i1", "ts": NOW - 10}
    event.update(fields)
    return json.dumps({k: v for k, v in event.items() if v is not ...}).encode()


def _reason(validator: EventValidator, payload: bytes) -> str:
    events, errors = validator.parse_message(payload)
    assert not events and len(errors) == 1
    return errors[0].reason


def test_a_valid_click_is_accepted(validator: EventValidator) -> None:
    events, errors = validator.parse_message(_msg(context={"page": "home"}, event_id="e1"))
    assert errors == []
    assert events[0].type == "click" and events[0].context == {"page": "home"}


def test_ratings_on_the_scale_are_accepted_at_both_ends(validator: EventValidator) -> None:
    for value in (1, 5, 3.5):
        events, errors = validator.parse_message(_msg(type="rating", value=value))
        assert errors == [] and events[0].value == float(value)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty message"),
        (b"{broken", "not valid JSON"),
        (b"[]", "empty event array"),
        (b'"text"', "must be a JSON object"),
        (_msg(item_id=...), "missing field 'item_id'"),
        (_msg(type=...), "missing field 'type'"),
        (_msg(ts=...), "missing field 'ts'"),
        (_msg(user_id=42), "'user_id' must be a string, got number"),
        (_msg(user_id=""), "non-empty printable"),
        (_msg(user_id="x" * 129), "over the limit of 128"),
        (_msg(type="like"), "unknown type 'like'"),
        (_msg(ts="yesterday"), "'ts' must be a number, got string"),
        (_msg(ts=True), "'ts' must be a number, got boolean"),
        (_msg(ts=1234.0), "plausible unix time"),
        (_msg(ts=NOW + 10 * 86400), "plausible unix time"),
        (_msg(type="rating"), "a rating needs a numeric 'value'"),
        (_msg(type="rating", value=0.5), "outside the scale"),
        (_msg(type="rating", value=5.5), "outside the scale"),
        (_msg(type="click", value=-1), "must not be negative"),
        (_msg(context=[1]), "'context' must be a JSON object"),
        (_msg(colour="red"), "unknown field(s) ['colour']"),
        (b'{"type":"rating","user_id":"u","item_id":"i","value":NaN,"ts":1.7e9}', "NaN"),
        (b'{"type":"rating","user_id":"u","item_id":"i","value":Infinity,"ts":1.7e9}', "Infinity"),
        (b'{"type":"click","user_id":"u","item_id":"i","ts":1e999}', "finite"),
    ],
)
def test_each_malformed_event_is_rejected_with_its_reason(
    validator: EventValidator, payload: bytes, reason: str
) -> None:
    assert reason in _reason(validator, payload)


def test_oversize_messages_are_rejected_before_parsing() -> None:
    validator = EventValidator(Settings(max_message_bytes=100), clock=lambda: NOW)
    assert "exceeds the limit of 100" in _reason(validator, b" " * 101)


def test_one_bad_event_in_an_array_does_not_reject_its_neighbours(
    validator: EventValidator,
) -> None:
    good = json.loads(_msg())
    payload = json.dumps([good, {**good, "type": "like"}, good]).encode()
    events, errors = validator.parse_message(payload)
    assert len(events) == 2
    assert [e.index for e in errors] == [1] and errors[0].reason.startswith("event [1]")
