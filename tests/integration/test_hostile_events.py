"""Hostile events: ten thousand generated malformed messages among valid ones (issue 11).

A seeded generator draws bad messages from a table of hostile kinds (huge numbers, deep
nesting, invalid UTF-8, control characters, wrong types, NaN and infinities, absurd times,
oversize ids and payloads near and over the message size limit, schema breaks, arrays that
mix valid and invalid events) and interleaves them with valid events, some of them at the
edges of the schema (128-character and non-ASCII ids, the oldest and newest accepted times,
ratings at both ends of the scale). All of it goes through a real broker to a real worker.

The worker must not crash, must send exactly one dead letter per bad message (its original
bytes, a reason that says what was wrong, how many events it rejected, where it came from),
and must apply every valid event exactly once: the worker's applied-events counter and the
per-item click and impression counts equal what was sent, and every user's history holds the
item of its event. Each bad message has a key of its own, so its dead letter is found by key.
"""

from __future__ import annotations

import collections
import json
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from freshrec.devenv.processes import wait_for
from freshrec.settings import Settings
from freshrec.store.keys import Keys
from freshrec.streams.producer import EventProducer
from freshrec.streams.worker import DEAD_LETTER_BYTES
from tests.support import TopicReader

pytestmark = pytest.mark.integration

SEED = 11
BAD_MESSAGES = 10_000
VALID_MESSAGES = 3_000
LIMITS = Settings.from_env()  # the limits the worker under test validates with
LIMIT = LIMITS.max_message_bytes
NOW = time.time()
TS = NOW - 600
TOO_LATE = NOW + LIMITS.max_future_s + 6 * 3600  # past the horizon however long the test takes
ITEMS = [f"item-{n}" for n in range(40)] + [
    "i" * LIMITS.max_id_length,  # the longest accepted id
    "çà-☃-ü",
    "😀 item",
    "{tag}:x",
    'quote " and \\ back',
]
# The broker's default max message size is 1 MiB plus a little; the producer's, 1,000,000.
PRODUCER_CONFIG = {"message.max.bytes": 1_048_000}
# Longer bad messages are dead-lettered as their first DEAD_LETTER_BYTES (see the last test).
NEAR_LIMIT = min(LIMIT, DEAD_LETTER_BYTES) - 10_000


@dataclass
class Bad:
    """One hostile message and what its dead letter must say."""

    kind: str
    payload: bytes | None
    reason: str  # a fragment of the dead letter's reason
    rejected: int = 1
    valid: list[dict[str, Any]] = field(default_factory=list)  # sent in the same message
    also: str = ""  # another fragment it must hold


def _event(**fields: Any) -> dict[str, Any]:
    event = {"type": "click", "user_id": "bad-user", "item_id": "bad-item", "ts": TS}
    event.update(fields)
    return {k: v for k, v in event.items() if v is not ...}


def _raw(**fields: str) -> bytes:
    """An event whose fields are given as raw JSON text (literals json.dumps would not write)."""
    texts = {k: json.dumps(v) for k, v in _event().items()}
    texts.update(fields)
    return ("{" + ",".join(f'"{k}":{v}' for k, v in texts.items() if v is not ...) + "}").encode()


def _json(**fields: Any) -> bytes:
    return json.dumps(_event(**fields)).encode()


def _valid_event(rng: random.Random, n: int) -> dict[str, Any]:
    """A valid event of user ``ok-<n>`` (one event per user), sometimes at the schema's edges."""
    kind = rng.choices(["click", "view", "rating", "purchase", "impression"], [5, 1, 2, 1, 1])[0]
    user = rng.choice([f"ok-{n}", f"ok-{n}", f"ok-{n}", f"ok-{n} ünï 😀 {{x}}:y"])
    if rng.random() < 0.05:
        user = f"ok-{n}-".ljust(LIMITS.max_id_length, "u")
    ts = rng.choice(
        [
            TS - rng.uniform(0, 3600),
            TS - rng.uniform(0, 3600),
            LIMITS.min_event_ts + rng.uniform(0, 60),  # the oldest accepted times
            NOW + LIMITS.max_future_s - 3600,  # the newest, an hour short of the horizon
        ]
    )
    event: dict[str, Any] = {
        "event_id": f"ok-{n}",
        "type": kind,
        "user_id": user,
        "item_id": rng.choice(ITEMS),
        "ts": ts,
    }
    if kind == "rating":
        event["value"] = rng.choice([LIMITS.rating_min, LIMITS.rating_max, 3, 4.5])
    elif rng.random() < 0.2:
        event["value"] = rng.choice([0, 1, 2.5, 1e300])
    if rng.random() < 0.2:
        event["context"] = {"page": "home", "nested": [[{"deep": None}]], "n": 10**30}
    return event


def _mostly(rng: random.Random, low: int, high: int, now_and_then: int) -> int:
    """A size from ``low`` to ``high``, and one time in thirty up to ``now_and_then``."""
    return rng.randint(low, high if rng.random() < 29 / 30 else now_and_then)


# --- the hostile kinds -------------------------------------------------------------------------
# Each variant draws one bad message; the comments say which rule it breaks.


def _huge_numbers(rng: random.Random) -> Bad:
    digits = "9" * rng.randint(310, 4300)  # overflows a float, still an int Python converts
    many = "9" * rng.randint(4301, 20_000)  # more digits than Python converts at all
    target, fragment = rng.choice(
        [
            ("ts", "'ts' must be a finite number"),
            ("rating", "'value' must be a finite number"),
            ("value", "'value' must be a finite number"),
        ]
    )
    variants = [
        (digits, fragment),
        ("-" + digits, fragment),
        (rng.choice(["1e400", "-1E999", "1e309"]), fragment),
        (many, "digits, over the limit of 4300"),
    ]
    text, fragment = rng.choice(variants)
    if target == "rating":
        return Bad("huge numbers", _raw(type='"rating"', value=text), fragment)
    if target == "ts":
        return Bad("huge numbers", _raw(ts=text), fragment)
    return Bad("huge numbers", _raw(value=text), fragment)


def _huge_but_finite(rng: random.Random) -> Bad:
    return rng.choice(
        [
            Bad("huge numbers", _raw(ts="1e308"), "not a plausible unix time"),
            Bad("huge numbers", _raw(type='"rating"', value="1e308"), "outside the scale"),
            Bad("huge numbers", _raw(type='"rating"', value=str(10**18)), "outside the scale"),
            Bad("huge numbers", _raw(ts=str(-(10**300))), "not a plausible unix time"),
        ]
    )


def _deep_nesting(rng: random.Random) -> Bad:
    # Past Python's recursion limit (1,000) whatever the stack below; now and then far past.
    depth = _mostly(rng, 2_000, 4_000, 100_000)
    closed = rng.randint(2_000, 3_000)
    context = '{"a":' * closed + "1" + "}" * closed
    return rng.choice(
        [
            Bad("deep nesting", b"[" * depth, "nested too deeply"),
            Bad("deep nesting", b'{"a":' * depth, "nested too deeply"),
            Bad("deep nesting", b"[" * closed + b"1" + b"]" * closed, "nested too deeply"),
            Bad("deep nesting", _raw(context=context), "nested too deeply"),
            Bad("deep nesting", _raw(value="[" * 50 + "]" * 50), "'value' must be a number"),
        ]
    )


UTF8_BREAKERS = [
    b"\xff",
    b"\xfe",
    b"\x80",  # a continuation byte alone
    b"\xc0\xaf",  # overlong
    b"\xed\xa0\x80",  # a surrogate, encoded
    b"\xe2\x82",  # cut short
    b"\xf4\x90\x80\x80",  # past U+10FFFF
    b"\xf8\x88\x80\x80\x80",  # five bytes
]


def _invalid_utf8(rng: random.Random) -> Bad:
    event = json.dumps(_event(user_id="bad-ü")).encode()
    at = event.index(b"bad-") + 4
    broken = event[:at] + rng.choice(UTF8_BREAKERS) + event[at:]
    encoded = json.dumps(_event(), ensure_ascii=False)
    return rng.choice(
        [
            Bad("invalid UTF-8", broken, "not UTF-8"),
            Bad("invalid UTF-8", event + b"\xe2", "not UTF-8"),
            Bad("invalid UTF-8", encoded.encode("utf-16"), "not UTF-8"),
            Bad("invalid UTF-8", encoded.encode(rng.choice(["utf-16-le", "utf-32-be"])), "NUL"),
            Bad("invalid UTF-8", encoded.encode("utf-8-sig"), "byte order mark"),
            Bad("invalid UTF-8", _json(user_id="bad-é").replace(b"\\u00e9", b"\xe9"), "UTF-8"),
            Bad("invalid UTF-8", b"\xff" + rng.randbytes(rng.randint(0, 500)), "not UTF-8"),
        ]
    )


CONTROLS = ["\x00", "\x07", "\x1b[31m", "\x7f", "\u202e", "\u2028", "\ufeff", "\t", "\ud800"]


def _control_characters(rng: random.Random) -> Bad:
    char = rng.choice(CONTROLS)
    ident = rng.choice(["user_id", "item_id"])
    raw_char = chr(rng.randint(0, 0x1F))
    raw = b'{"type":"click","user_id":"bad' + raw_char.encode() + b'","item_id":"i","ts":1.7e9}'
    return rng.choice(
        [
            Bad("control characters", _json(**{ident: f"bad{char}"}), "non-empty printable"),
            Bad("control characters", _json(event_id=f"e{char}"), "'event_id' must be non-empty"),
            Bad("control characters", _json(type=f"click{char}"), "unknown type"),
            Bad("control characters", _json(**{f"x{char}": 1}), "unknown field"),
            Bad("control characters", raw, "not valid JSON"),
        ]
    )


WRONG_TYPES: list[tuple[str, Any, str]] = [
    *(("type", v, "unknown type") for v in (1, ["click"], {"a": 1}, None, True)),
    *(("user_id", v, "'user_id' must be a string") for v in (1, 1.5, True, None, [], {})),
    *(("item_id", v, "'item_id' must be a string") for v in (7, False, None, ["i"], {"i": 1})),
    *(("ts", v, "'ts' must be a number") for v in (str(int(TS)), True, None, [TS], {"s": TS})),
    *(("value", v, "'value' must be a number") for v in ("1", False, [1], {})),
    *(("event_id", v, "'event_id' must be a string") for v in (1, True, [], {})),
    *(("context", v, "'context' must be a JSON object") for v in (1, "home", [], True)),
]


def _wrong_types(rng: random.Random) -> Bad:
    name, value, fragment = rng.choice(WRONG_TYPES)
    if rng.random() < 0.3 and name == "value":
        return Bad("wrong types", _json(type="rating", value=value), fragment)
    if rng.random() < 0.15:
        top = rng.choice([1, "click", None, True, 2.5])
        return Bad("wrong types", json.dumps(top).encode(), "an event must be a JSON object")
    if rng.random() < 0.05:
        return Bad("wrong types", b'[1,"a",null]', "event [2]: an event must be", rejected=3)
    return Bad("wrong types", _json(**{name: value}), fragment)


def _nan_inf(rng: random.Random) -> Bad:
    literal = rng.choice(["NaN", "Infinity", "-Infinity"])
    return rng.choice(
        [
            Bad("NaN/inf", _raw(ts=literal), f"{literal.lstrip('-')} is not a JSON number"),
            Bad("NaN/inf", _raw(type='"rating"', value=literal), "is not a JSON number"),
            Bad("NaN/inf", _raw(value=literal), "is not a JSON number"),
            Bad("NaN/inf", _raw(context=f'{{"x":{literal}}}'), "is not a JSON number"),
            Bad("NaN/inf", _raw(ts=rng.choice(["1e999", "-1e999"])), "must be a finite number"),
        ]
    )


ABSURD_TIMES = [0, -1, 1, 86_400, LIMITS.min_event_ts - 1, NOW * 1e3, NOW * 1e6, NOW * 1e9]
ABSURD_TIMES += [TOO_LATE, NOW + 100 * 365 * 86_400, 1e300, -1e300, 2**63, -(2**63)]


def _absurd_times(rng: random.Random) -> Bad:
    return Bad("absurd times", _json(ts=rng.choice(ABSURD_TIMES)), "not a plausible unix time")


def _oversize_fields(rng: random.Random) -> Bad:
    long = "x" * _mostly(rng, LIMITS.max_id_length + 1, 1_000, 100_000)
    ident = rng.choice(["user_id", "item_id"])
    fields = {f"f{n}": n for n in range(_mostly(rng, 6, 300, 3_000))}
    empties = _mostly(rng, 11, 300, 3_000)
    return rng.choice(
        [
            Bad("oversize", _json(**{ident: long}), f"over the limit of {LIMITS.max_id_length}"),
            Bad(
                "oversize", _json(event_id="e" * _mostly(rng, 513, 2_000, 50_000)), "over the limit"
            ),
            Bad("oversize", _json(type=long), "unknown type"),
            Bad("oversize", _json(**fields), "in all)"),
            Bad(
                "oversize",
                b"[" + b",".join([b"{}"] * empties) + b"]",
                f"... and {empties - 10} more",
                rejected=empties,
            ),
        ]
    )


def _schema(rng: random.Random) -> Bad:
    event = json.dumps(_event()).encode()
    cut = rng.randint(1, len(event) - 1)
    required = rng.choice(["type", "user_id", "item_id", "ts"])
    return rng.choice(
        [
            Bad("schema", _json(**{required: ...}), f"missing field '{required}'"),
            Bad("schema", _json(type=rng.choice(["like", "Click", ""])), "unknown type"),
            Bad("schema", _json(type="rating", value=...), "a rating needs a numeric 'value'"),
            Bad(
                "schema",
                _json(type="rating", value=rng.choice([0, 0.999, 5.0001, -3, 6])),
                "outside the scale",
            ),
            Bad("schema", _json(value=-rng.uniform(1e-9, 10)), "must not be negative"),
            Bad("schema", _json(colour="red"), "unknown field(s) ['colour']"),
            Bad("schema", rng.choice([b"", None]), "empty message"),
            Bad("schema", b"[]", "empty event array"),
            Bad("schema", event[:cut], "not valid JSON"),
            Bad("schema", event + b"x", "not valid JSON: Extra data"),
            Bad("schema", event + event, "not valid JSON: Extra data"),
            Bad("schema", b"{'type': 'click'}", "not valid JSON"),
        ]
    )


KINDS: list[Callable[[random.Random], Bad]] = [
    _huge_numbers,
    _huge_but_finite,
    _deep_nesting,
    _invalid_utf8,
    _control_characters,
    _wrong_types,
    _nan_inf,
    _absurd_times,
    _oversize_fields,
    _schema,
]
KIND_NAMES = {
    "huge numbers",
    "deep nesting",
    "invalid UTF-8",
    "control characters",
    "wrong types",
    "NaN/inf",
    "absurd times",
    "oversize",
    "schema",
    "mixed array",
}


def _padded(size: int, **fields: Any) -> dict[str, Any]:
    """An event of ``fields`` whose JSON is ``size`` bytes: the rest is a context's padding."""
    event = {**fields, "context": {"pad": ""}}
    event["context"]["pad"] = "p" * (size - len(json.dumps(event)))
    return event


def _near_the_size_limit() -> list[Bad]:
    """Bad messages close under the longest a dead letter carries whole; longer ones, and
    those at and over FRESHREC_MAX_MESSAGE_BYTES, see the last test."""
    return [
        Bad("oversize", json.dumps(_padded(size, **_event(), colour="red")).encode(), "colour")
        for size in (LIMIT // 2, NEAR_LIMIT)
    ]


@dataclass
class Corpus:
    """What is sent, in order, and what it must lead to."""

    messages: list[tuple[bytes, bytes | None, Bad | None]]  # key, payload, bad or None
    valid: list[dict[str, Any]]  # every valid event, including those in mixed arrays

    @property
    def bad(self) -> dict[bytes, Bad]:
        return {key: bad for key, _, bad in self.messages if bad is not None}


def _an_event_alone(payload: bytes | None) -> bool:
    """Whether a bad message is one JSON object, so it can stand in an array as a bad event
    (and not spoil the whole array, as bytes that are no JSON would)."""

    def no_constant(name: str) -> None:
        raise ValueError(name)

    try:
        text = (payload or b"").decode("utf-8")
        decoded = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError):
        return False
    return isinstance(decoded, dict) and "\x00" not in text


def _mixed_array(rng: random.Random, next_valid: Callable[[], dict[str, Any]]) -> Bad | None:
    """Valid events and bad ones in one array: one dead letter, the valid ones applied."""
    drawn = [KINDS[rng.randrange(len(KINDS))](rng) for _ in range(rng.randint(1, 2))]
    broken = [b for b in drawn if _an_event_alone(b.payload)]
    if not broken:
        return None
    good = [next_valid() for _ in range(rng.randint(1, 3))]
    parts: list[tuple[bytes, Bad | None]] = [(json.dumps(e).encode(), None) for e in good]
    parts += [(b.payload or b"", b) for b in broken]
    rng.shuffle(parts)
    first, first_bad = next((n, b) for n, (_, b) in enumerate(parts) if b is not None)
    payload = b"[" + b",".join(p for p, _ in parts) + b"]"
    return Bad("mixed array", payload, f"event [{first}]: ", len(broken), good, first_bad.reason)


def hostile_corpus(seed: int = SEED) -> Corpus:
    """Every message to send, in a seeded order: bad ones by kind in turn, valid ones between."""
    rng = random.Random(seed)
    valid: list[dict[str, Any]] = []

    def next_valid() -> dict[str, Any]:
        valid.append(_valid_event(rng, len(valid)))
        return valid[-1]

    bad = _near_the_size_limit()
    while len(bad) < BAD_MESSAGES:
        if rng.random() < 0.05:
            if (mixed := _mixed_array(rng, next_valid)) is not None:
                bad.append(mixed)
            continue
        bad.append(KINDS[len(bad) % len(KINDS)](rng))
    messages: list[tuple[bytes, bytes | None, Bad | None]] = [
        (f"bad-{n}".encode(), b.payload, b) for n, b in enumerate(bad)
    ]
    big = _padded(NEAR_LIMIT, **next_valid())  # a valid message near the limit is learned
    messages.append((big["user_id"].encode(), json.dumps(big).encode(), None))
    for _ in range(VALID_MESSAGES - 1):
        if rng.random() < 0.1:  # an array of events, as the producer helper batches them
            events = [next_valid() for _ in range(rng.randint(2, 5))]
            messages.append((events[0]["user_id"].encode(), json.dumps(events).encode(), None))
        else:
            event = next_valid()
            messages.append((event["user_id"].encode(), json.dumps(event).encode(), None))
    rng.shuffle(messages)
    return Corpus(messages, valid)


# --- the tests ---------------------------------------------------------------------------------


def test_corpus_covers_every_hostile_kind() -> None:
    corpus = hostile_corpus()
    kinds = collections.Counter(b.kind for b in corpus.bad.values())
    assert set(kinds) == KIND_NAMES, kinds
    assert min(kinds.values()) >= 200, kinds
    assert len(corpus.bad) == BAD_MESSAGES
    assert len({e["event_id"] for e in corpus.valid}) == len(corpus.valid) >= VALID_MESSAGES
    sizes = sorted(len(p or b"") for _, p, _ in corpus.messages)
    assert sizes[-3:] == [LIMIT // 2, NEAR_LIMIT, NEAR_LIMIT]  # bad, bad, valid


@pytest.mark.timeout(900)
def test_hostile_messages_each_give_one_dead_letter_and_every_valid_event_lands_once(
    settings: Settings, worker: subprocess.Popen, redis_client: redis.Redis, tmp_path: Path
) -> None:
    corpus = hostile_corpus()
    started = time.monotonic()
    _send(settings, [(key, payload) for key, payload, _ in corpus.messages])
    letters = _dead_letters(settings, redis_client, corpus, worker, tmp_path / "worker.log")
    elapsed = time.monotonic() - started

    _assert_one_dead_letter_each(settings, letters, corpus.bad)
    _assert_applied_exactly_once(settings, redis_client, corpus.valid)
    assert not list(redis_client.scan_iter(match=Keys(settings.key_prefix).history("bad-*")))
    _assert_still_running(worker, tmp_path / "worker.log")
    print(
        f"\n{len(corpus.messages)} messages ({len(corpus.bad)} bad, "
        f"{len(corpus.valid)} valid events) produced, dead-lettered and applied in {elapsed:.0f} s"
    )


@pytest.mark.timeout(600)
def test_messages_at_and_over_the_size_limit_each_give_one_dead_letter(
    settings: Settings, worker: subprocess.Popen, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """At the limit (bad, not too large) and over it (too large): one dead letter each, whose
    value is the message or (a dead letter must fit the broker too) its first bytes."""
    rng = random.Random(SEED)
    bad = {
        b"at-the-limit": Bad("oversize", b" " * (LIMIT - 2) + b"{}", "missing field 'type'"),
        **{
            f"over-{size}".encode(): Bad(
                "oversize", b" " * (size - 2) + b"{}", f"exceeds the limit of {LIMIT}"
            )
            for size in (LIMIT + 1, LIMIT + 40_000)
        },
    }
    valid = [_valid_event(rng, n) for n in range(60)]
    messages = [(e["user_id"].encode(), json.dumps(e).encode()) for e in valid[:30]]
    for key, b in bad.items():  # on the partitions of the valid events sent after them too
        messages.append((key, b.payload or b""))
    messages += [(b"bad-user", json.dumps(e).encode()) for e in valid[30:]]
    _send(settings, messages)
    corpus = Corpus([(k, b.payload, b) for k, b in bad.items()], valid)
    letters = _dead_letters(settings, redis_client, corpus, worker, tmp_path / "worker.log")

    by_key = _by_key(letters)
    assert set(by_key) == set(bad) and all(len(found) == 1 for found in by_key.values())
    for key, b in bad.items():
        (letter,) = by_key[key]
        headers = dict(letter.headers())
        assert b.reason in headers["freshrec-reason"].decode(), key
        assert (b.payload or b"").startswith(letter.value()), key
        assert len(letter.value()) == min(len(b.payload or b""), DEAD_LETTER_BYTES), key
        if len(b.payload or b"") > DEAD_LETTER_BYTES:
            assert headers["freshrec-original-bytes"] == str(len(b.payload or b"")).encode()
    _assert_applied_exactly_once(settings, redis_client, valid)
    _assert_still_running(worker, tmp_path / "worker.log")


def _send(settings: Settings, messages: list[tuple[bytes, bytes | None]]) -> None:
    with EventProducer(
        settings.kafka_bootstrap, settings.events_topic, config=PRODUCER_CONFIG
    ) as producer:
        for key, payload in messages:
            producer.send_raw(payload, key=key)  # type: ignore[arg-type]  # None: a tombstone


def _dead_letters(
    settings: Settings, client: redis.Redis, corpus: Corpus, worker: subprocess.Popen, log: Path
) -> list[Any]:
    """Every dead letter once there are as many as bad messages and every valid event is
    applied; fails at once if the worker exits or logs a traceback."""
    stats = f"{settings.key_prefix}:stats:worker"
    dlq = TopicReader(settings.kafka_bootstrap, settings.dlq_topic)
    try:
        try:
            wait_for(
                lambda: (
                    len(dlq.poll()) >= len(corpus.bad)
                    and int(client.hget(stats, "events") or 0) >= len(corpus.valid)
                ),
                600,
                f"{len(corpus.bad)} dead letters and {len(corpus.valid)} valid events applied",
                poll_s=1.0,
                check=lambda: _assert_still_running(worker, log),
            )
        except (TimeoutError, AssertionError) as exc:
            applied = int(client.hget(stats, "events") or 0)
            raise AssertionError(
                f"{len(dlq.messages)} dead letters of {len(corpus.bad)}, "
                f"{applied} valid events applied of {len(corpus.valid)}: {exc}"
            ) from exc
        return list(dlq.poll())  # anything late, too
    finally:
        dlq.close()


def _assert_still_running(worker: subprocess.Popen, log: Path) -> None:
    text = log.read_text(errors="replace")
    assert worker.poll() is None, f"the worker exited ({worker.returncode}):\n{text[-3000:]}"
    assert "Traceback" not in text, f"the worker logged a traceback:\n{text[-5000:]}"


def _by_key(letters: list[Any]) -> dict[bytes, list[Any]]:
    found: dict[bytes, list[Any]] = collections.defaultdict(list)
    for letter in letters:
        found[letter.key()].append(letter)
    return found


def _assert_one_dead_letter_each(
    settings: Settings, letters: list[Any], expected: dict[bytes, Bad]
) -> None:
    by_key = _by_key(letters)
    extra = set(by_key) - set(expected)
    assert not extra, f"dead letters for messages that were valid: {sorted(extra)[:5]}"
    twice = [key for key, found in by_key.items() if len(found) != 1]
    assert not twice, f"{len(twice)} bad messages with more than one dead letter: {twice[:5]}"
    assert set(by_key) == set(expected)
    sources = set()
    for key, bad in expected.items():
        (letter,) = by_key[key]
        headers = dict(letter.headers())
        reason = headers["freshrec-reason"].decode()
        context = (bad.kind, (bad.payload or b"")[:120], reason[:300])
        assert letter.value() == bad.payload, context
        assert bad.reason in reason and bad.also in reason, context
        assert headers["freshrec-rejected"] == str(bad.rejected).encode(), context
        assert 0 < len(headers["freshrec-reason"]) <= 4096, context
        source = headers["freshrec-source"].decode()
        assert source.startswith(settings.events_topic + "/"), context
        sources.add(source)
    assert len(sources) == len(expected)  # one message each, none counted twice


def _assert_applied_exactly_once(
    settings: Settings, client: redis.Redis, valid: list[dict[str, Any]]
) -> None:
    """The worker's applied-events counter, the per-item click and impression counts and every
    user's history (one user per valid event) against what was sent."""
    prefix = settings.key_prefix
    assert int(client.hget(f"{prefix}:stats:worker", "events") or 0) == len(valid)
    for kind, key in (("click", Keys(prefix).clicks), ("impression", Keys(prefix).impressions)):
        sent = collections.Counter(e["item_id"] for e in valid if e["type"] == kind)
        stored = {m.decode(): s for m, s in client.zrange(key, 0, -1, withscores=True)}
        assert stored == dict(sent), kind
    interactions = [e for e in valid if e["type"] != "impression"]
    pipe = client.pipeline(transaction=False)
    for event in interactions:
        pipe.zscore(Keys(prefix).history(event["user_id"]), event["item_id"])
    missing = [e for e, score in zip(interactions, pipe.execute(), strict=True) if score is None]
    assert not missing, f"{len(missing)} events not in their user's history: {missing[:3]}"
