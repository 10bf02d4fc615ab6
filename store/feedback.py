"""Closing the loop: what was shown, what was clicked, and what the click model learns from it.

Each impression is remembered per user (item -> features and variant) for the attribution
window, and learned as a negative; a click on a remembered item within the window is
attributed to that impression (once), learned as a positive, and counted for its variant.

The memory is written, and a click's impression forgotten, by the write of the batch that
brings them (`freshrec.store.batch_update.HashWrites`), with its offset watermarks: a worker
that ends at any point leaves either both or neither, and the batch redelivered to the next
finds them as they were. The click model learns in memory once that write has landed.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from freshrec.models.click_model import ClickModel, state_from_hash
from freshrec.settings import Settings
from freshrec.store import strict_json
from freshrec.store.batch_update import HashWrites, Identified
from freshrec.store.keys import Keys


@dataclass(frozen=True)
class Shown:
    """One item of a served list."""

    user_id: str
    item_id: str
    position: int
    variant: str
    request_id: str
    features: dict[str, float]
    ts: float | None = None  # event time it was shown at (the reader's state clock)


class FeedbackLearner:
    """Learns the click model from this worker's impressions and clicks, and merges it with
    every other worker's through Redis (`sync`)."""

    def __init__(self, redis: Redis, keys: Keys, model: ClickModel, window_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.model = model
        self.window_s = window_s
        self.merged = model.state()  # the state as of the last merge

    @classmethod
    async def load(cls, redis: Redis, keys: Keys, window_s: int, **params: Any) -> FeedbackLearner:
        """Resume the click model every worker has learned so far."""
        state = state_from_hash(await redis.hgetall(keys.click_model_state))
        return cls(redis, keys, ClickModel.from_state(state, **params), window_s)

    def remember(self, shown: Sequence[Shown]) -> HashWrites:
        """The impressions' memory, per user (item -> variant, request, position, features,
        time shown), expiring after the window in wall-clock time (which bounds memory): the
        hash writes of their batch."""
        per_user: dict[str, dict[str, str]] = {}
        for s in shown:
            record = {
                "variant": s.variant,
                "request_id": s.request_id,
                "position": s.position,
                "features": s.features,
                "ts": s.ts,
            }
            per_user.setdefault(self.keys.shown(s.user_id), {})[s.item_id] = orjson.dumps(
                record
            ).decode()
        return HashWrites(set=per_user, ttl_s=self.window_s)

    def learn_impressions(self, shown: Sequence[Shown]) -> Counter[str]:
        """Learn impressions as negatives; returns impressions per variant."""
        self.model.learn_many([_training_features(s) for s in shown], [False] * len(shown))
        return Counter(s.variant for s in shown)

    async def shown_for(
        self, clicks: Sequence[tuple[str, str, float]]
    ) -> tuple[list[dict[str, Any] | None], HashWrites]:
        """Each click's remembered impression (None where there is none), and the hash writes
        that forget them, for the clicks' batch: a click is attributed once. A click on the
        same (user, item) as an earlier one of ``clicks`` finds none. One ``HMGET`` per user."""
        items: dict[str, dict[str, None]] = {}  # user -> their clicked items, each once
        for user, item, _ in clicks:
            items.setdefault(user, {})[item] = None
        pipe = self.redis.pipeline(transaction=False)
        for user, clicked in items.items():
            pipe.hmget(self.keys.shown(user), list(clicked))
        replies = await pipe.execute() if items else []
        found = {
            (user, item): raw
            for (user, clicked), raws in zip(items.items(), replies, strict=True)
            for item, raw in zip(clicked, raws, strict=True)
            if raw is not None
        }
        records: list[dict[str, Any] | None] = []
        forget: dict[str, list[str]] = {}
        for user, item, _ in clicks:
            raw = found.pop((user, item), None)  # the first click on it takes it
            records.append(None if raw is None else json.loads(raw))
            if raw is not None:
                forget.setdefault(self.keys.shown(user), []).append(item)
        return records, HashWrites(delete=forget)

    def learn_clicks(
        self, clicks: Sequence[tuple[str, str, float]], records: Sequence[dict[str, Any] | None]
    ) -> tuple[Counter[str], list[bool]]:
        """Attribute clicks ``(user, item, event time)`` to their remembered impressions
        (`shown_for`) and learn them; returns attributed clicks per variant, and for each click
        whether it was attributed: whether the item had been in a list served to that user
        (the served lists' hit).

        The window is in event time: a click counts when it comes at most ``window_s`` after
        its impression was shown, so a replayed log attributes as live traffic did.
        """
        attributed: Counter[str] = Counter()
        hits = [False] * len(clicks)
        for n, (record, (_, _, clicked_at)) in enumerate(zip(records, clicks, strict=True)):
            if record is None:
                continue
            shown_at = record.get("ts")
            if shown_at is not None and clicked_at - shown_at > self.window_s:
                continue
            hits[n] = True
            # The click is learned with its impression's features, position included: a
            # positive without it reads as position 0, and then the position weight explains
            # clicks at the top and the served scores are learned backwards.
            self.model.learn_click(_with_position(record["features"], record.get("position", 0)))
            attributed[record["variant"]] += 1
        return attributed, hits

    async def sync(self) -> None:
        """Add what this worker learned since the last merge to the shared state, atomically,
        and continue from the sum (which holds what the other workers added meanwhile)."""
        mine = self.model.state()
        learned = {k: v - self.merged.get(k, 0.0) for k, v in mine.items()}
        key = self.keys.click_model_state
        pipe = self.redis.pipeline(transaction=True)  # one key: also atomic on Redis Cluster
        for field, amount in learned.items():
            if amount != 0.0:
                pipe.hincrbyfloat(key, field, amount)
        pipe.hgetall(key)
        *_, merged = await pipe.execute()
        self.merged = state_from_hash(merged)
        self.model.load_state(self.merged)


class BatchClicks:
    """A batch's clicks, attributed with its write: their impressions read once the batch
    knows which of its events are new (`writes_for`), forgotten by its write, and learned once
    that write has landed (`learn`)."""

    def __init__(self, learner: FeedbackLearner, events: Sequence[Identified]) -> None:
        self.learner = learner
        self.clicks = {
            n: (e.user_id, e.item_id, e.ts) for n, e in enumerate(events) if e.type == "click"
        }
        self._records: dict[int, dict[str, Any] | None] = {}

    async def writes_for(self, positions: list[int]) -> HashWrites:
        mine = [n for n in positions if n in self.clicks]
        records, writes = await self.learner.shown_for([self.clicks[n] for n in mine])
        self._records.update(zip(mine, records, strict=True))
        return writes

    def learn(self, applied: Sequence[int]) -> tuple[Counter[str], list[bool]]:
        """Attribute and learn the clicks among the batch's ``applied`` positions."""
        mine = [n for n in applied if n in self.clicks]
        return self.learner.learn_clicks(
            [self.clicks[n] for n in mine], [self._records.get(n) for n in mine]
        )


class BatchImpressions:
    """A batch's impressions, remembered by its write (`writes_for`)."""

    def __init__(self, learner: FeedbackLearner, shown: Sequence[Shown]) -> None:
        self.learner = learner
        self.shown = shown

    async def writes_for(self, positions: list[int]) -> HashWrites:
        return self.learner.remember([self.shown[n] for n in positions])


def _training_features(s: Shown) -> dict[str, float]:
    return _with_position(s.features, s.position)


def _with_position(features: dict[str, float], position: int) -> dict[str, float]:
    """The features as learned: as served, plus the position (a training-only feature)."""
    return {**features, "log_position": math.log1p(position)}


MAX_POSITION = 10_000  # a served list is at most FRESHREC_MAX_K long; this is generous
MAX_ITEMS = 10_000
MAX_FEATURES = 64
MAX_FEATURE_NAME = 64
MAX_VARIANT = 64
MAX_REQUEST_ID = 256


def parse_impression(
    payload: bytes | None,
    max_id_length: int = 128,
    max_message_bytes: int = 1_000_000,
    ts_range: tuple[float, float] | None = None,
) -> list[Shown]:
    """One impressions-topic message into its items; ValueError with a reason if malformed.

    ``ts_range`` bounds the impression's time as the event validator bounds an event's
    (``FRESHREC_MIN_EVENT_TS`` to now plus ``FRESHREC_MAX_FUTURE_S``; by default 1990 to a day
    ahead): a time far off would open or shut its clicks' attribution window for good. A
    message without a time, or whose time is no number, takes the message's own time instead.
    Never raises anything else, whatever the bytes (a poison message must not stop the worker).
    """
    if ts_range is None:
        ts_range = (Settings.min_event_ts, time.time() + Settings.max_future_s)
    try:
        return _parse_impression(payload, max_id_length, max_message_bytes, ts_range)
    except ValueError:
        raise
    except Exception as exc:  # an unforeseen input is a reason, not a crash
        raise ValueError(f"could not be validated ({type(exc).__name__})") from None


def _parse_impression(
    payload: bytes | None, max_id_length: int, max_message_bytes: int, ts_range: tuple[float, float]
) -> list[Shown]:
    if payload and len(payload) > max_message_bytes:
        raise ValueError(
            f"message of {len(payload)} bytes exceeds the limit of {max_message_bytes}"
        )
    try:
        message = strict_json.loads(payload or b"")
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(message, dict):
        raise ValueError("an impression must be a JSON object")
    user, items = message.get("user_id"), message.get("items")
    if not _is_id(user, max_id_length):
        raise ValueError(
            f"'user_id' must be a non-empty printable string of at most {max_id_length}"
        )
    if not isinstance(items, list):
        raise ValueError("'items' must be an array")
    if len(items) > MAX_ITEMS:
        raise ValueError(f"{len(items)} items, over the limit of {MAX_ITEMS}")
    variant = message.get("variant", "control")
    if not _is_id(variant, MAX_VARIANT):
        raise ValueError(f"'variant' must be a non-empty printable string of at most {MAX_VARIANT}")
    ts = message.get("ts")
    if not _is_number(ts) or not math.isfinite(float(ts)):
        ts = None  # readers before event time: the worker uses the message's time instead
    elif not ts_range[0] <= ts <= ts_range[1]:
        raise ValueError(
            f"'ts' {ts!r} is not a plausible unix time in seconds (from {ts_range[0]:.0f} "
            f"to {ts_range[1]:.0f})"
        )
    request_id = message.get("request_id", "")
    if not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID:
        raise ValueError(f"'request_id' must be a string of at most {MAX_REQUEST_ID} characters")
    shown = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or not _is_id(item.get("item_id"), max_id_length):
            raise ValueError(
                f"items[{n}] needs a non-empty printable string 'item_id' of at most "
                f"{max_id_length} characters"
            )
        features = _features(item.get("features") or {}, n)
        position = item.get("position", n)
        if not (
            _is_number(position)
            and math.isfinite(float(position))
            and float(position).is_integer()
            and 0 <= position <= MAX_POSITION
        ):
            raise ValueError(f"items[{n}].position must be an integer from 0 to {MAX_POSITION}")
        shown.append(Shown(user, item["item_id"], int(position), variant, request_id, features, ts))
    return shown


def _features(features: Any, n: int) -> dict[str, float]:
    if not isinstance(features, dict):
        raise ValueError(f"items[{n}].features must be a JSON object")
    if len(features) > MAX_FEATURES:
        raise ValueError(
            f"items[{n}] has {len(features)} features, over the limit of {MAX_FEATURES}"
        )
    out = {}
    for name, value in features.items():
        if len(name) > MAX_FEATURE_NAME:
            raise ValueError(f"items[{n}] has a feature name over {MAX_FEATURE_NAME} characters")
        if not _is_number(value) or not math.isfinite(float(value)):
            raise ValueError(f"items[{n}].features must map names to finite numbers")
        out[name] = float(value)
    return out


def _is_number(value: Any) -> bool:
    """A JSON number that fits a float (a huge integer overflows ``float()``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not isinstance(value, int) or abs(value) < 2**1023


def _is_id(value: Any, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()
