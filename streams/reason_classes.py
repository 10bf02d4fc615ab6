"""Reason classes of dead letters: a fixed, small label set for metrics.

A dead letter's reason is free text (it names fields, values and limits), so it cannot be a
Prometheus label: every distinct text would be a series of its own. The class is what an
operator acts on (a producer sending oversize messages, a broken serialiser, a client on an old
schema, values out of range) and has a handful of values, whatever the producers send.

Examples
--------
>>> reason_class("not valid JSON: Expecting value: line 1 column 1 (char 0)")
'json'
>>> reason_class("event [3]: rating 7 outside the scale [1.0, 5.0]")
'value'
>>> reason_class("event [0]: missing field 'type'")
'schema'
>>> reason_class("impression: 80 items, over the limit of 64")
'size'
>>> reason_class("something nobody foresaw")
'other'
"""

from __future__ import annotations

REASON_CLASSES = ("size", "json", "schema", "value", "time", "other")
"""Every value the ``reason`` label of the dead-letter metrics can take."""

# First match wins, so the more specific phrases come first.
_PHRASES: tuple[tuple[str, str], ...] = (
    ("not a plausible unix time", "time"),
    ("exceeds the limit", "size"),
    ("over the limit", "size"),
    ("not valid JSON", "json"),
    ("empty message", "json"),
    ("empty event array", "json"),
    ("outside the scale", "value"),
    ("must be a finite number", "value"),
    ("must not be negative", "value"),
    ("finite numbers", "value"),
    ("must be an integer from", "value"),
    ("could not be validated", "other"),
    ("missing field", "schema"),
    ("unknown field", "schema"),
    ("unknown type", "schema"),
    ("must be", "schema"),
    ("needs a numeric", "schema"),
)


def reason_class(reason: str) -> str:
    """The class (one of `REASON_CLASSES`) of one rejection reason."""
    for phrase, label in _PHRASES:
        if phrase in reason:
            return label
    return "other"
