"""The worker's drift monitor over what each batch already computed, and its firings in Redis.

The worker predicts every rating before it learns it, so the batch's prequential errors come
for free; its items and users are the data whose distributions may drift. `BatchDrift` feeds
them to a `freshrec.models.drift.DriftMonitor` (signals ``rating_error``,
``item_divergence``, ``user_divergence``) and `record_firings` keeps the latest
`RECENT_FIRINGS` firings, newest first, as JSON in one Redis list the reader shows at
``GET /drift``. The monitor lives in each worker's memory: with several workers each watches
its own partitions, and their firings share the list.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from freshrec.models.drift import PER_EVENT, PER_WINDOW, DriftMonitor, Firing, WindowDivergence
from freshrec.store.keys import Keys

__all__ = ["RECENT_FIRINGS", "SIGNALS", "BatchDrift", "read_firings", "record_firings"]

RECENT_FIRINGS = 100
SIGNALS = {
    "rating_error": PER_EVENT,
    "item_divergence": PER_WINDOW,
    "user_divergence": PER_WINDOW,
}
# Events per window of the item and user distributions (one divergence value per window).
WINDOW_EVENTS = 500


class BatchDrift:
    """The drift signals of the batches a worker applies, in the order it applies them."""

    def __init__(self, window: int = WINDOW_EVENTS) -> None:
        self.monitor = DriftMonitor(SIGNALS, history=RECENT_FIRINGS)
        self.items = WindowDivergence(window=window, reference_windows=5)
        self.users = WindowDivergence(window=window, reference_windows=5)

    def observe(
        self, items: Sequence[str], users: Sequence[str], rating_errors: Sequence[float], ts: float
    ) -> list[Firing]:
        """Feed one batch (its events' items and users, its ratings' errors ``r - r_hat``)
        applied up to event time ``ts``; return the firings it caused."""
        fired = self.monitor.update_many("rating_error", map(abs, rating_errors), ts)
        fired += self.monitor.update_many("item_divergence", self.items.update(items), ts)
        fired += self.monitor.update_many("user_divergence", self.users.update(users), ts)
        return fired


async def record_firings(client: Any, keys: Keys, firings: Sequence[Firing]) -> None:
    """Push the firings onto the list, newest first, and trim it (one key, one transaction)."""
    if not firings:
        return
    payloads = [json.dumps(f.as_dict(), separators=(",", ":")) for f in firings]
    async with client.pipeline(transaction=True) as pipe:
        pipe.lpush(keys.drift_firings, *payloads)
        pipe.ltrim(keys.drift_firings, 0, RECENT_FIRINGS - 1)
        await pipe.execute()


async def read_firings(client: Any, keys: Keys) -> list[dict[str, Any]]:
    """The recorded firings, newest first."""
    return [json.loads(raw) for raw in await client.lrange(keys.drift_firings, 0, -1)]
