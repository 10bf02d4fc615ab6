"""Publishes fresh top-K lists of the users a batch touched to the recommendations topic.

Users are collected as batches land and published on a fixed interval, so a user who sends ten
events in a second gets one message, not ten (per-user debounce), and the learning path never
waits for ranking.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable

from serving.funnel import Funnel

Send = Callable[[bytes, bytes], Awaitable[object]]


class RecommendationPublisher:
    def __init__(self, funnel: Funnel, send: Send, k: int) -> None:
        self.funnel = funnel
        self.send = send
        self.k = k
        self._pending: dict[str, float] = {}
        self.published = 0

    def touch(self, users: Iterable[str], event_ts: float) -> None:
        for user in users:
            self._pending[user] = max(event_ts, self._pending.get(user, 0.0))

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def publish_pending(self) -> int:
        pending, self._pending = self._pending, {}
        done = 0
        try:
            for user, event_ts in pending.items():
                await self._publish(user, event_ts)
                done += 1
        except Exception:
            # Keep the unpublished users for the next round (Redis or Kafka briefly down).
            for user, event_ts in list(pending.items())[done:]:
                self._pending[user] = max(event_ts, self._pending.get(user, 0.0))
            raise
        finally:
            self.published += done
        return done

    async def _publish(self, user: str, event_ts: float) -> None:
        ranked = await self.funnel.recommend(user, self.k)
        message = {
            "user_id": user,
            "items": [c.to_json() for c in ranked],
            "generated_at": time.time(),
            "latest_event_ts": event_ts,
        }
        await self.send(user.encode(), json.dumps(message, separators=(",", ":")).encode())
