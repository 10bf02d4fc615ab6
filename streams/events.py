"""The event schema and its strict validation.

A message on ``freshrec.events`` carries one JSON event or a JSON array of events. Every way an
event can be wrong has a reason string; the worker forwards the original bytes with that reason
to the dead-letter topic, so nothing is lost and nothing bad reaches the models.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from freshrec.settings import Settings
from freshrec.store import strict_json

EVENT_TYPES = ("click", "view", "rating", "purchase", "impression")
_FIELDS = frozenset(("event_id", "type", "user_id", "item_id", "value", "ts", "context"))
MAX_REASON_CHARS = 300  # one event's reason
MAX_REASON_HEADER_BYTES = 4096  # a dead letter's reason header, however many events failed


class InvalidEvent(ValueError):
    """An event that breaks the schema; ``reason`` says how, for the dead-letter topic."""

    def __init__(self, reason: str, index: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.index = index


@dataclass(frozen=True, slots=True)
class Event:
    """One validated interaction; ``value`` is the rating, or the strength of an implicit event."""

    type: str
    user_id: str
    item_id: str
    ts: float
    value: float | None = None
    event_id: str | None = None
    context: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "user_id": self.user_id,
            "item_id": self.item_id,
            "ts": self.ts,
        }
        if self.value is not None:
            out["value"] = self.value
        if self.event_id is not None:
            out["event_id"] = self.event_id
        if self.context is not None:
            out["context"] = self.context
        return out


class EventValidator:
    """Validates raw messages against the schema with the limits from `Settings`.

    Examples
    --------
    >>> v = EventValidator(Settings())
    >>> e = v.parse_one({"type": "rating", "user_id": "u1", "item_id": "i9", "value": 4, "ts": 1e9})
    >>> e.type, e.user_id, e.item_id, e.value, e.ts
    ('rating', 'u1', 'i9', 4.0, 1000000000.0)
    >>> v.parse_one({"type": "rating", "user_id": "u1", "item_id": "i9", "value": 7, "ts": 1e9})
    Traceback (most recent call last):
    ...
    freshrec.streams.events.InvalidEvent: rating 7 outside the scale [1.0, 5.0]
    """

    def __init__(self, settings: Settings, clock: Any = time.time) -> None:
        self.settings = settings
        self._clock = clock

    def parse_message(self, payload: bytes | None) -> tuple[list[Event], list[InvalidEvent]]:
        """Split one message into its valid events and the reasons for the invalid ones.

        A message that is not JSON at all, or too large, is one error; in an array each element
        stands alone, so one bad event does not discard its neighbours. Never raises: whatever
        the bytes, every failure becomes a reason (a poison message must not stop the worker).
        """
        try:
            return self._parse_message(payload)
        except Exception as exc:  # the last line of defence, see above
            return [], [InvalidEvent(f"message could not be validated ({_describe(exc)})")]

    def _parse_message(self, payload: bytes | None) -> tuple[list[Event], list[InvalidEvent]]:
        if payload is None or len(payload) == 0:
            return [], [InvalidEvent("empty message")]
        if len(payload) > self.settings.max_message_bytes:
            return [], [
                InvalidEvent(
                    f"message of {len(payload)} bytes exceeds the limit of "
                    f"{self.settings.max_message_bytes} (FRESHREC_MAX_MESSAGE_BYTES)"
                )
            ]
        try:
            # UTF-8 only: json.loads would also guess UTF-16 and UTF-32 from the bytes.
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            return [], [
                InvalidEvent(
                    f"not valid JSON: not UTF-8 text (byte {exc.start}: {exc.reason}); "
                    "send JSON encoded as UTF-8"
                )
            ]
        if problem := _not_json_text(text):
            return [], [InvalidEvent(f"not valid JSON: {problem}")]
        try:
            decoded = strict_json.decode(text)  # UTF-8, no byte order mark: checked above
        except RecursionError:
            return [], [InvalidEvent("not valid JSON: nested too deeply")]
        except ValueError as exc:
            return [], [InvalidEvent(_bounded(f"not valid JSON: {_json_error(exc)}"))]
        if isinstance(decoded, list):
            if not decoded:
                return [], [InvalidEvent("empty event array")]
            events, errors = [], []
            for index, item in enumerate(decoded):
                try:
                    events.append(self.parse_one(item))
                except InvalidEvent as exc:
                    errors.append(InvalidEvent(f"event [{index}]: {exc.reason}", index))
            return events, errors
        try:
            return [self.parse_one(decoded)], []
        except InvalidEvent as exc:
            return [], [exc]

    def parse_one(self, obj: Any) -> Event:
        """One decoded event, or `InvalidEvent` (and only that) with the reason it is not one."""
        try:
            return self._parse_one(obj)
        except InvalidEvent:
            raise
        except Exception as exc:  # an unforeseen input is a reason, not a crash
            raise InvalidEvent(f"event could not be validated ({_describe(exc)})") from None

    def _parse_one(self, obj: Any) -> Event:
        if not isinstance(obj, dict):
            raise InvalidEvent(f"an event must be a JSON object, got {_json_type(obj)}")
        if not _FIELDS.issuperset(obj):
            unknown = obj.keys() - _FIELDS
            names = sorted(_short(name, 40) for name in unknown)
            shown = ", ".join(names[:5]) + (
                f", ... ({len(names)} in all)" if len(names) > 5 else ""
            )
            raise InvalidEvent(f"unknown field(s) [{shown}]; allowed: {sorted(_FIELDS)}")
        kind = obj.get("type")
        if kind not in EVENT_TYPES:
            if "type" not in obj:
                raise InvalidEvent("missing field 'type'")
            raise InvalidEvent(f"unknown type {_short(kind)}; expected one of {list(EVENT_TYPES)}")
        user_id = self._identifier(obj, "user_id")
        item_id = self._identifier(obj, "item_id")
        ts = self._timestamp(obj)
        value = self._value(obj, kind)
        event_id = obj.get("event_id")
        if event_id is not None:
            self._event_id(event_id)
        context = obj.get("context")
        if context is not None and not isinstance(context, dict):
            raise InvalidEvent(f"'context' must be a JSON object, got {_json_type(context)}")
        return Event(kind, user_id, item_id, ts, value, event_id, context)

    def _identifier(self, obj: dict[str, Any], name: str) -> str:
        if name not in obj:
            raise InvalidEvent(f"missing field {name!r}")
        value = obj[name]
        if not isinstance(value, str):
            raise InvalidEvent(f"{name!r} must be a string, got {_json_type(value)}")
        if not value or not value.isprintable():
            raise InvalidEvent(f"{name!r} must be non-empty printable text")
        if len(value) > self.settings.max_id_length:
            raise InvalidEvent(
                f"{name!r} is {len(value)} characters, over the limit of "
                f"{self.settings.max_id_length} (FRESHREC_MAX_ID_LENGTH)"
            )
        return value

    def _event_id(self, value: Any) -> None:
        if not isinstance(value, str):
            raise InvalidEvent(f"'event_id' must be a string, got {_json_type(value)}")
        if not value or not value.isprintable():
            raise InvalidEvent("'event_id' must be non-empty printable text")
        limit = 4 * self.settings.max_id_length
        if len(value) > limit:
            raise InvalidEvent(
                f"'event_id' is {len(value)} characters, over the limit of {limit} "
                "(4 x FRESHREC_MAX_ID_LENGTH)"
            )

    def _timestamp(self, obj: dict[str, Any]) -> float:
        if "ts" not in obj:
            raise InvalidEvent("missing field 'ts'")
        ts = _number(obj["ts"], "ts")
        latest = self._clock() + self.settings.max_future_s
        if not self.settings.min_event_ts <= ts <= latest:
            lo, ahead = self.settings.min_event_ts, self.settings.max_future_s
            raise InvalidEvent(
                f"ts {ts!r} is not a plausible unix time in seconds "
                f"(accepted: {lo:.0f} to now + {ahead:.0f} s)"
            )
        return ts

    def _value(self, obj: dict[str, Any], kind: str) -> float | None:
        raw = obj.get("value")
        if kind == "rating":
            if raw is None:
                raise InvalidEvent("a rating needs a numeric 'value'")
            value = _number(raw, "value")
            lo, hi = self.settings.rating_min, self.settings.rating_max
            if not lo <= value <= hi:
                raise InvalidEvent(f"rating {_short(raw)} outside the scale [{lo}, {hi}]")
            return value
        if raw is None:
            return None
        value = _number(raw, "value")
        if value < 0:
            raise InvalidEvent(f"'value' of a {kind} must not be negative, got {_short(raw)}")
        return value


def _number(raw: Any, name: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise InvalidEvent(f"{name!r} must be a number, got {_json_type(raw)}")
    try:
        value = float(raw)  # an integer of hundreds of digits overflows a float
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise InvalidEvent(f"{name!r} must be a finite number, got {_short(raw)}")
    return value


def _not_json_text(text: str) -> str | None:
    """What makes decoded text plainly not a JSON text, where json.loads would say it less
    clearly (a character out of place) or not at all."""
    if text.startswith("\ufeff"):
        return "starts with a byte order mark (U+FEFF); send UTF-8 without one"
    if "\x00" in text:  # never in JSON text: what UTF-16 or UTF-32 look like read as UTF-8
        return "holds NUL characters (UTF-16 or UTF-32?); send JSON encoded as UTF-8"
    return None


_DIGITS_LIMIT = re.compile(r"Exceeds the limit \((\d+) digits\).*value has (\d+) digits")


def _json_error(exc: ValueError) -> str:
    """The decoder's complaint, in the producer's terms."""
    text = str(exc)
    if digits := _DIGITS_LIMIT.search(text):  # Python's int() limit, not a JSON rule as such
        return f"a number of {digits[2]} digits, over the limit of {digits[1]}"
    return text


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` of a value from a message, cut to ``limit`` characters (reasons stay small)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"<integer of {len(str(abs(value)))} digits>"  # before repr: huge ints are slow
    text = repr(value) if isinstance(value, (str, int, float, bool)) or value is None else None
    if text is None:
        return f"<{_json_type(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bounded(text: str, limit: int = MAX_REASON_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(exc: BaseException) -> str:
    return _bounded(f"{type(exc).__name__}: {exc}", 200)


def summarise_reasons(
    reasons: list[str], shown: int = 10, max_bytes: int = MAX_REASON_HEADER_BYTES
) -> str:
    """One dead letter's reason header: the first ``shown`` reasons, then how many more.

    The result is at most ``max_bytes`` once encoded as UTF-8 (unencodable characters, such as
    lone surrogates from a JSON string, are backslash-escaped), however many reasons there are.

    >>> summarise_reasons(["event [0]: missing field 'type'"] * 12, shown=2)
    "event [0]: missing field 'type'; event [0]: missing field 'type'; ... and 10 more"
    """
    parts = [_bounded(r) for r in reasons[:shown]]
    if len(reasons) > shown:
        parts.append(f"... and {len(reasons) - shown} more")
    encoded = "; ".join(parts).encode("utf-8", "backslashreplace")
    if len(encoded) > max_bytes:
        tail = f" ... (cut to {max_bytes} bytes; {len(reasons)} reasons)".encode()
        encoded = encoded[: max(0, max_bytes - len(tail))] + tail
        encoded = encoded[:max_bytes]
    return encoded.decode("utf-8", "ignore")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


_WIRE = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # made once, not per call


def encode_events(events: list[dict[str, Any]] | dict[str, Any]) -> bytes:
    """Compact JSON for the wire; one event or an array of events for one partition."""
    return _WIRE.encode(events).encode()
