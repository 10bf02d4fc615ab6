"""Hostile messages, generated: whatever the bytes, the validator answers with reasons.

Property-based (hypothesis, derandomized so a run is reproducible): arbitrary bytes,
arbitrary JSON (huge numbers, NaN and infinities, deep nesting, lone surrogates, control
characters), and valid events mutated field by field or byte by byte. For every message
`EventValidator.parse_message` returns; what it accepts keeps to the schema; every rejected
event has a clear reason of its own (never the catch-all for an unforeseen exception); and the
reasons of one message fit one dead letter's header.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freshrec.settings import Settings
from freshrec.streams.events import (
    EVENT_TYPES,
    MAX_REASON_HEADER_BYTES,
    Event,
    EventValidator,
    InvalidEvent,
    summarise_reasons,
)
from freshrec.streams.reason_classes import REASON_CLASSES, reason_class

NOW = 1_795_000_000.0
LIMITS = Settings()
VALIDATOR = EventValidator(LIMITS, clock=lambda: NOW)
LATEST_TS = NOW + LIMITS.max_future_s
MAX_REASON_CHARS = 600  # one event's reason, index prefix included: a line an operator reads

PROPERTIES = settings(
    max_examples=250,
    deadline=None,  # a shared, slow machine; speed has its own test below
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- strategies ------------------------------------------------------------------------------

# What Python calls printable: letters, marks, numbers, punctuation, symbols, and the space.
PRINTABLE = st.characters(categories=["L", "M", "N", "P", "S"]) | st.just(" ")
IDENTIFIERS = st.text(PRINTABLE, min_size=1, max_size=LIMITS.max_id_length)
# Every code point: controls, format characters, unassigned ones and lone surrogates too.
ANY_CHARACTER = (
    st.characters(codec=None, categories=None)
    | st.characters(categories=["Cs"])
    | st.characters(max_codepoint=0x1F)
)
HOSTILE_TEXT = st.text(ANY_CHARACTER, max_size=40)
HUGE_INTEGERS = st.integers(min_value=-(10**400), max_value=10**400)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | HUGE_INTEGERS
    | st.floats()  # NaN and the infinities included
    | HOSTILE_TEXT
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(HOSTILE_TEXT, inner, max_size=6),
    max_leaves=20,
)
# What a context may hold: any JSON, but JSON (no NaN, no infinities).
CONTEXT_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)
# JSON text of hostile scalars that json.dumps does not write: literals, malformed numbers.
RAW_LITERALS = st.sampled_from(
    [
        "NaN",
        "-NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        "-1e400",
        "1e-400",
        "9" * 400,
        "9" * 5000,  # more digits than Python converts to an int
        "0x10",
        "01",
        ".5",
        "1.",
        "+1",
        "1e",
        "--1",
        "true",
        "null",
        '"\\u0000"',
        '"\\ud800"',
        '"\\udfff\\ud800"',
        '"\x01\x7f"',
        "[]",
        "{}",
        "[[[[[[[[[[]]]]]]]]]]",
    ]
)
# Absurd times: ms, us and ns since the epoch, before 1990, negative, after the horizon.
ABSURD_TS = st.sampled_from(
    [0, -1, 1.5, 631151999.0, NOW * 1e3, NOW * 1e6, NOW * 1e9, LATEST_TS + 1, 1e300, -1e300, 2**63]
)


def _value_json(value: Any, ascii_only: bool) -> str:
    return json.dumps(value, allow_nan=True, ensure_ascii=ascii_only)


def _encode(text: str) -> bytes:
    """UTF-8, except that lone surrogates become the invalid bytes CESU-8 would write."""
    return text.encode("utf-8", "surrogatepass")


def _decode(payload: bytes) -> str:
    return payload.decode("utf-8", "surrogatepass")


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(EVENT_TYPES))
    event: dict[str, Any] = {
        "type": kind,
        "user_id": draw(IDENTIFIERS),
        "item_id": draw(IDENTIFIERS),
        "ts": draw(
            st.floats(LIMITS.min_event_ts, LATEST_TS)
            | st.integers(int(LIMITS.min_event_ts), int(LATEST_TS))
        ),
    }
    if kind == "rating":
        event["value"] = draw(
            st.floats(LIMITS.rating_min, LIMITS.rating_max)
            | st.integers(int(LIMITS.rating_min), int(LIMITS.rating_max))
        )
    elif draw(st.booleans()):
        event["value"] = draw(st.none() | st.floats(0, 1e300) | st.integers(0, 10**12))
    if draw(st.booleans()):
        event["event_id"] = draw(st.text(PRINTABLE, min_size=1, max_size=64))
    if draw(st.booleans()):
        event["context"] = draw(st.dictionaries(st.text(max_size=10), CONTEXT_VALUES, max_size=4))
    return event


FIELDS = ["type", "user_id", "item_id", "value", "ts", "event_id", "context"]


@st.composite
def mutated_events(draw: st.DrawFn) -> bytes:
    """A valid event with one field dropped, replaced by something hostile, or one added."""
    event = draw(valid_events())
    ascii_only = draw(st.booleans())
    parts = {name: _value_json(value, ascii_only) for name, value in event.items()}
    field = draw(st.sampled_from(FIELDS))
    mutation = draw(st.sampled_from(["drop", "json", "raw", "text", "absurd ts", "long", "extra"]))
    if mutation == "drop":
        parts.pop(field, None)
    elif mutation == "json":
        parts[field] = _value_json(draw(JSON_VALUES), ascii_only)
    elif mutation == "raw":
        parts[field] = draw(RAW_LITERALS)
    elif mutation == "text":
        parts[field] = _value_json(draw(HOSTILE_TEXT), ascii_only)
    elif mutation == "absurd ts":
        parts["ts"] = _value_json(draw(ABSURD_TS), ascii_only)
    elif mutation == "long":
        parts[field] = _value_json("x" * draw(st.integers(129, 100_000)), ascii_only)
    else:
        parts[draw(HOSTILE_TEXT)] = _value_json(draw(JSON_VALUES), ascii_only)
    text = "{" + ",".join(f"{_value_json(k, ascii_only)}:{v}" for k, v in parts.items()) + "}"
    return _encode(text)


@st.composite
def corrupted_bytes(draw: st.DrawFn) -> bytes:
    """A valid event's bytes cut short, or with bytes flipped, inserted or deleted."""
    payload = bytearray(json.dumps(draw(valid_events())).encode())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(payload)))
        how = draw(st.sampled_from(["cut", "flip", "insert", "delete"]))
        if how == "cut":
            del payload[at:]
        elif how == "flip" and at < len(payload):
            payload[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "insert":
            # controls, bytes that never start UTF-8, truncated sequences, a UTF-8 BOM
            noise = draw(
                st.sampled_from([b"\x00", b"\x1f", b"\x7f", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80"])
                | st.sampled_from([b"\xef\xbb\xbf", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xff"])
                | st.binary(min_size=1, max_size=4)
            )
            payload[at:at] = noise
        elif at < len(payload):
            del payload[at]
    return bytes(payload)


@st.composite
def deep_nesting(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(1, 200_000))
    opening, closing = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"context":', "}")]))
    closed = draw(st.booleans())
    return ((opening * depth) + ("1" + closing * depth if closed else "")).encode()


@st.composite
def json_messages(draw: st.DrawFn) -> bytes:
    return _encode(_value_json(draw(JSON_VALUES), draw(st.booleans())))


# --- what holds for every message ------------------------------------------------------------


def assert_within_schema(event: Event) -> None:
    """An accepted event is one the models can take: nothing hostile gets past."""
    assert event.type in EVENT_TYPES
    for name in ("user_id", "item_id"):
        ident = getattr(event, name)
        assert isinstance(ident, str) and 0 < len(ident) <= LIMITS.max_id_length, name
        assert ident.isprintable(), name
        ident.encode("utf-8")  # it names Redis keys
    assert type(event.ts) is float and math.isfinite(event.ts)
    assert LIMITS.min_event_ts <= event.ts <= LATEST_TS
    if event.type == "rating":
        assert type(event.value) is float
        assert LIMITS.rating_min <= event.value <= LIMITS.rating_max
    elif event.value is not None:
        assert type(event.value) is float and math.isfinite(event.value) and event.value >= 0
    if event.event_id is not None:
        assert isinstance(event.event_id, str) and event.event_id.isprintable()
        assert 0 < len(event.event_id) <= 4 * LIMITS.max_id_length
    assert event.context is None or isinstance(event.context, dict)


def validate(payload: bytes) -> tuple[list[Event], list[InvalidEvent]]:
    """``parse_message`` with every property a message of any content must have."""
    events, errors = VALIDATOR.parse_message(payload)
    assert isinstance(events, list) and isinstance(errors, list)
    assert events or errors, "a message vanished: no event and no reason"
    if events:  # JSON between systems is UTF-8 (RFC 8259 8.1), and nothing else is guessed at
        payload.decode("utf-8")
        assert not payload.startswith(b"\xef\xbb\xbf"), "accepted a byte order mark"
    for event in events:
        assert isinstance(event, Event)
        assert_within_schema(event)
    for error in errors:
        assert isinstance(error, InvalidEvent)
        reason = error.reason
        assert isinstance(reason, str) and reason.strip(), "an empty reason"
        assert reason.isprintable(), f"raw characters of the message in a reason: {reason!r}"
        assert len(reason) <= MAX_REASON_CHARS, reason[:200]
        assert "could not be validated" not in reason, f"an unforeseen failure: {reason}"
        assert reason_class(reason) in REASON_CLASSES
    indices = [e.index for e in errors if e.index is not None]
    assert len(indices) == len(set(indices)), "one event rejected twice"
    if errors:  # the one dead letter this message gives: one bounded header
        header = summarise_reasons([e.reason for e in errors]).encode()
        assert 0 < len(header) <= MAX_REASON_HEADER_BYTES
    return events, errors


def _comparable(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if v is not None}


# --- the properties --------------------------------------------------------------------------


@PROPERTIES
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_give_events_or_reasons(payload: bytes) -> None:
    validate(payload)


@PROPERTIES
@given(json_messages())
def test_arbitrary_json_gives_events_or_reasons(payload: bytes) -> None:
    validate(payload)


@PROPERTIES
@given(valid_events())
def test_every_valid_event_is_accepted_as_sent(event: dict[str, Any]) -> None:
    events, errors = validate(json.dumps(event).encode())
    assert errors == []
    assert [e.to_json() for e in events] == [_comparable(event)]


@PROPERTIES
@given(mutated_events())
def test_a_mutated_event_is_accepted_within_the_schema_or_rejected_with_a_reason(
    payload: bytes,
) -> None:
    events, errors = validate(payload)
    assert len(events) + len(errors) == 1


@PROPERTIES
@given(corrupted_bytes())
def test_corrupted_bytes_give_events_or_reasons(payload: bytes) -> None:
    validate(payload)


@settings(PROPERTIES, max_examples=60)
@given(deep_nesting())
def test_deep_nesting_gives_a_reason(payload: bytes) -> None:
    validate(payload)


@settings(PROPERTIES, max_examples=100)
@given(st.lists(valid_events().map(json.dumps) | mutated_events().map(_decode), max_size=6))
def test_each_event_of_an_array_is_accepted_or_rejected_on_its_own(parts: list[str]) -> None:
    events, errors = validate(_encode("[" + ",".join(parts) + "]"))
    if not parts:
        assert [e.reason for e in errors] == ["empty event array"]
    elif len(errors) == 1 and errors[0].index is None:  # bytes that are no JSON array at all
        assert events == [] and "not valid JSON" in errors[0].reason
    else:
        assert len(events) + len(errors) == len(parts)
        assert all(e.index is not None and 0 <= e.index < len(parts) for e in errors)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_an_event_in_another_encoding_than_utf8_is_rejected(encoding: str) -> None:
    event = {"type": "click", "user_id": "u", "item_id": "i", "ts": NOW}
    events, errors = validate(json.dumps(event).encode(encoding))
    assert events == [] and len(errors) == 1
    assert errors[0].reason.startswith("not valid JSON: ")
    assert "UTF-8" in errors[0].reason


def test_a_number_of_thousands_of_digits_is_a_reason_for_the_producer() -> None:
    payload = f'{{"type":"click","user_id":"u","item_id":"i","ts":{"9" * 5000}}}'.encode()
    (error,) = validate(payload)[1]
    assert "5000 digits" in error.reason and "sys." not in error.reason, error.reason


@pytest.mark.parametrize(
    ("event_id", "reason"),
    [
        ("", "'event_id' must be non-empty printable text"),
        ("\x00", "'event_id' must be non-empty printable text"),
        ("a\tb", "'event_id' must be non-empty printable text"),
        ("\u202e", "'event_id' must be non-empty printable text"),  # right-to-left override
        (7, "'event_id' must be a string, got number"),
        ("x" * 513, "'event_id' is 513 characters, over the limit of 512"),
    ],
)
def test_an_event_id_must_be_printable_text_of_reasonable_length(
    event_id: object, reason: str
) -> None:
    event = {"type": "click", "user_id": "u", "item_id": "i", "ts": NOW, "event_id": event_id}
    (error,) = validate(json.dumps(event).encode())[1]
    assert error.reason.startswith(reason), error.reason
