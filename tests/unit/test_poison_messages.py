"""Poison messages: whatever the bytes, validation returns reasons and never raises.

Each input here once escaped as an exception (OverflowError, RecursionError) and crashed the
worker's agent, or was accepted when it should not have been, or made a reason without bound.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from freshrec.settings import Settings
from freshrec.store.feedback import parse_impression
from freshrec.streams.events import EventValidator, summarise_reasons
from freshrec.streams.worker import variant_labels

NOW = 1_795_000_000.0
HUGE_INT = "9" * 400


@pytest.fixture
def validator() -> EventValidator:
    return EventValidator(Settings(), clock=lambda: NOW)


def _rating(value: str) -> bytes:
    return (
        f'{{"type":"rating","user_id":"u","item_id":"i","value":{value},"ts":{NOW - 10}}}'
    ).encode()


def _only_reason(validator: EventValidator, payload: bytes) -> str:
    events, errors = validator.parse_message(payload)
    assert events == [] and len(errors) == 1
    return errors[0].reason


def test_a_400_digit_rating_is_not_a_finite_number(validator: EventValidator) -> None:
    reason = _only_reason(validator, _rating(HUGE_INT))
    assert "'value' must be a finite number" in reason
    assert len(reason) < 200  # the 400 digits are not copied into the reason


def test_a_400_digit_value_is_rejected_inside_an_array_next_to_valid_events(
    validator: EventValidator,
) -> None:
    good = json.loads(_rating("4"))
    payload = f"[{json.dumps(good)},{_rating(HUGE_INT).decode()},{json.dumps(good)}]".encode()
    events, errors = validator.parse_message(payload)
    assert len(events) == 2
    assert [e.index for e in errors] == [1]
    assert errors[0].reason.startswith("event [1]: 'value' must be a finite number")


def test_huge_numbers_elsewhere_are_reasons_too(validator: EventValidator) -> None:
    click = f'{{"type":"click","user_id":"u","item_id":"i","ts":{HUGE_INT}}}'.encode()
    assert "'ts' must be a finite number" in _only_reason(validator, click)
    assert "outside the scale" in _only_reason(validator, _rating("9" * 300))
    assert len(_only_reason(validator, _rating("9" * 300))) < 200


def test_a_huge_unknown_type_gives_a_short_reason(validator: EventValidator) -> None:
    payload = json.dumps({"type": "x" * 100_000, "user_id": "u", "item_id": "i", "ts": 1e9})
    reason = _only_reason(validator, payload.encode())
    assert "unknown type" in reason and len(reason) < 200


def test_many_unknown_fields_give_a_short_reason(validator: EventValidator) -> None:
    fields = {f"f{n}" * 50: n for n in range(1000)}
    reason = _only_reason(validator, json.dumps(fields).encode())
    assert "unknown field(s)" in reason and "1000 in all" in reason and len(reason) < 500


@pytest.mark.parametrize("opening", [b"[", b'{"a":'])
def test_deep_nesting_is_a_reason_not_a_recursion_error(
    validator: EventValidator, opening: bytes
) -> None:
    reason = _only_reason(validator, opening * 100_000)
    assert reason == "not valid JSON: nested too deeply"


def test_a_lone_surrogate_is_a_reason(validator: EventValidator) -> None:
    payload = b'{"type":"\\ud800","user_id":"u","item_id":"i","ts":1e9}'
    assert "unknown type" in _only_reason(validator, payload)


def test_parse_one_raises_only_invalid_event(validator: EventValidator) -> None:
    # The replay and the evaluation call parse_one directly and catch InvalidEvent only.
    from freshrec.streams.events import InvalidEvent

    for raw in (
        {"type": "rating", "user_id": "u", "item_id": "i", "value": int(HUGE_INT), "ts": 1e9},
        {"type": ["rating"], "user_id": "u", "item_id": "i", "ts": 1e9},
        {"type": "click", "user_id": "u", "item_id": "i", "ts": 1e9, "event_id": {"a": 1}},
    ):
        with pytest.raises(InvalidEvent):
            validator.parse_one(raw)


def test_2000_empty_objects_give_2000_reasons_and_a_bounded_summary(
    validator: EventValidator,
) -> None:
    events, errors = validator.parse_message(b"[" + b",".join([b"{}"] * 2000) + b"]")
    assert events == [] and len(errors) == 2000
    assert errors[1999].reason == "event [1999]: missing field 'type'"
    summary = summarise_reasons([e.reason for e in errors])
    assert summary.startswith("event [0]: missing field 'type'; event [1]: missing field 'type'")
    assert summary.count("missing field 'type'") == 10
    assert summary.endswith("... and 1990 more")
    assert len(summary.encode()) <= 4096


def test_a_summary_of_long_reasons_is_cut_to_its_byte_limit() -> None:
    reasons = ["é" * 10_000, *("x" * 10_000 for _ in range(20))]
    summary = summarise_reasons(reasons, max_bytes=1000)
    assert len(summary.encode()) <= 1000
    assert "(cut to 1000 bytes; 21 reasons)" in summary
    assert len(summarise_reasons(reasons).encode()) <= 4096


def test_a_summary_escapes_what_utf8_cannot_encode() -> None:
    summary = summarise_reasons(["bad \ud800 char"])
    assert summary.encode() == b"bad \\ud800 char"


def test_an_unforeseen_failure_inside_validation_is_a_reason(
    validator: EventValidator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(obj: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(validator, "_parse_one", broken)
    events, errors = validator.parse_message(b'[{"a": 1}, {"b": 2}]')
    assert events == [] and [e.index for e in errors] == [0, 1]
    assert "could not be validated (KeyError" in errors[0].reason


# --- impressions ---------------------------------------------------------------------------------


def _impression(**overrides: object) -> dict:
    item = {"item_id": "i1", "position": 0, "features": {"mf": 0.5, "cf": 0.1}}
    message = {
        "request_id": "r1",
        "user_id": "u1",
        "variant": "control",
        "ts": NOW,
        "items": [item],
    }
    message.update(overrides)
    return message


def _impression_reason(payload: bytes) -> str:
    with pytest.raises(ValueError) as caught:
        parse_impression(payload)
    assert type(caught.value) is ValueError
    return str(caught.value)


def _with_item(**fields: object) -> bytes:
    item = {"item_id": "i1", "position": 0, "features": {"mf": 0.5}}
    item.update(fields)
    return json.dumps(_impression(items=[item])).encode()


def test_a_valid_impression_is_accepted() -> None:
    shown = parse_impression(json.dumps(_impression()).encode())
    assert [(s.item_id, s.position, s.variant, s.features) for s in shown] == [
        ("i1", 0, "control", {"mf": 0.5, "cf": 0.1})
    ]
    item = {"item_id": "i2", "position": 3.0, "features": {"mf": 1}}
    assert parse_impression(json.dumps(_impression(items=[item])).encode())[0].position == 3


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_with_item(position="1e999").replace(b'"1e999"', b"1e999"), "position must be an integer"),
        (_with_item(position=int(HUGE_INT)), "position must be an integer"),
        (_with_item(position=-1), "position must be an integer"),
        (_with_item(position=2.5), "position must be an integer"),
        (_with_item(position=True), "position must be an integer"),
        (_with_item(position=10**6), "position must be an integer"),
        (_with_item(features={"mf": "NaN"}).replace(b'"NaN"', b"NaN"), "NaN is not a JSON number"),
        (
            _with_item(features={"mf": "Infinity"}).replace(b'"Infinity"', b"-Infinity"),
            "-Infinity is not a JSON number",
        ),
        (_with_item(features={"mf": 1e308}).replace(b"1e+308", b"1e999"), "finite numbers"),
        (_with_item(features={"mf": int(HUGE_INT)}), "finite numbers"),
        (_with_item(features={"mf": True}), "finite numbers"),
        (_with_item(features={f"f{n}": 0.0 for n in range(65)}), "over the limit of 64"),
        (_with_item(features={"x" * 65: 0.0}), "feature name over 64"),
        (_with_item(features=[1, 2]), "features must be a JSON object"),
        (json.dumps(_impression(variant="v" * 100_000)).encode(), "'variant' must be"),
        (json.dumps(_impression(variant="a\nb")).encode(), "'variant' must be"),
        (json.dumps(_impression(variant=7)).encode(), "'variant' must be"),
        (json.dumps(_impression(variant="")).encode(), "'variant' must be"),
        (json.dumps(_impression(user_id="u" * 129)).encode(), "'user_id' must be"),
        (_with_item(item_id="i" * 129), "needs a non-empty printable string 'item_id'"),
        (json.dumps(_impression(request_id="r" * 1000)).encode(), "'request_id' must be"),
        (b"[" * 100_000, "nested too deeply"),
        (b"{nope", "not valid JSON"),
        (b"", "not valid JSON"),
        (json.dumps(_impression(ts=1e300)).encode(), "'ts' 1e+300 is not a plausible unix time"),
        (json.dumps(_impression(ts=-1e300)).encode(), "is not a plausible unix time"),
        (json.dumps(_impression(ts=12.0)).encode(), "'ts' 12.0 is not a plausible unix time"),
    ],
)
def test_each_poison_impression_is_a_reason(payload: bytes, reason: str) -> None:
    text = _impression_reason(payload)
    assert reason in text and len(text) < 300


def test_a_huge_impression_ts_is_ignored_not_a_crash() -> None:
    payload = json.dumps(_impression(ts=int(HUGE_INT))).encode()
    assert parse_impression(payload)[0].ts is None


def test_variant_labels_are_the_configured_variants_and_other() -> None:
    label = variant_labels(Settings())
    assert [label(v) for v in ("control", "v" * 64, "diverse")] == ["control", "other", "other"]
    spec = '{"control": {"share": 0.5}, "diverse": {"share": 0.5, "diversity": 0.6}}'
    label = variant_labels(dataclasses.replace(Settings(), variants=spec))
    assert [label(v) for v in ("control", "diverse", "x")] == ["control", "diverse", "other"]
    label = variant_labels(dataclasses.replace(Settings(), variants="{not json"))
    assert [label(v) for v in ("control", "diverse")] == ["control", "other"]
