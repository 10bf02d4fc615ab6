"""The worker's drift monitor over what each batch already computed, and its firings in Redis.

The worker predicts every rating before it learns it, so the batch's prequential errors come
for free; its items and users are the data whose distributions may drift; the impressions
and attributed clicks of each variant give its click-through, and whether each click was on
an item served to that user (the attribution already looks it up) the top-N hit rate of the
served lists. `BatchDrift` feeds them to a `freshrec.models.drift.DriftMonitor` (signals
``rating_error``, ``top_n_hit``, ``item_divergence``, ``user_divergence`` and
``ctr:<variant>``) and `record_firings` keeps the latest
`RECENT_FIRINGS` firings, newest first, as JSON in one Redis list the reader shows at
``GET /drift``. The monitor lives in each worker's memory: with several workers each watches
its own partitions, and their firings share the list.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from freshrec.models.drift import PER_EVENT, PER_WINDOW, DriftMonitor, Firing, WindowDivergence
from freshrec.store.keys import Keys

__all__ = [
    "HIT",
    "RECENT_FIRINGS",
    "SIGNALS",
    "BatchDrift",
    "ctr_signal",
    "read_firings",
    "record_firings",
]

RECENT_FIRINGS = 100
# A click's hit (1: the item was in a list served to the user): a rate, whose drop is the harm.
HIT = dataclasses.replace(PER_EVENT, mode="down")
SIGNALS = {
    "rating_error": PER_EVENT,
    "top_n_hit": HIT,
    "item_divergence": PER_WINDOW,
    "user_divergence": PER_WINDOW,
}
# Events per window of the item and user distributions (one divergence value per window).
WINDOW_EVENTS = 500
# Impressions per window of a variant's click-through (one CTR value per window).
WINDOW_IMPRESSIONS = 500
# A window's CTR is binomial noise around the rate: a longer warm-up measures that noise
# better and a higher threshold keeps it quiet (on simulated windows of 200 impressions at 10%:
# no firing in 20 streams of 70 level windows, a halving seen within 1 to 11 windows).
CTR = dataclasses.replace(PER_WINDOW, mode="down", warmup=30, ph_threshold=10.0)


def ctr_signal(variant: str) -> str:
    """The signal name of a variant's click-through (variants are few and configured)."""
    return f"ctr:{variant}"


class BatchDrift:
    """The drift signals of the batches a worker applies, in the order it applies them."""

    def __init__(
        self,
        variants: Sequence[str] = (),
        window: int = WINDOW_EVENTS,
        impressions_window: int = WINDOW_IMPRESSIONS,
    ) -> None:
        watches = {**SIGNALS, **{ctr_signal(v): CTR for v in variants}}
        self.monitor = DriftMonitor(watches, history=RECENT_FIRINGS)
        self.items = WindowDivergence(window=window, reference_windows=5)
        self.users = WindowDivergence(window=window, reference_windows=5)
        self.impressions_window = impressions_window
        self._shown: Counter[str] = Counter()
        self._clicked: Counter[str] = Counter()

    def observe(
        self, items: Sequence[str], users: Sequence[str], rating_errors: Sequence[float], ts: float
    ) -> list[Firing]:
        """Feed one batch (its events' items and users, its ratings' errors ``r - r_hat``)
        applied up to event time ``ts``; return the firings it caused."""
        fired = self.monitor.update_many("rating_error", map(abs, rating_errors), ts)
        fired += self.monitor.update_many("item_divergence", self.items.update(items), ts)
        fired += self.monitor.update_many("user_divergence", self.users.update(users), ts)
        return fired

    def observe_clicks(
        self, clicks: Mapping[str, int], hits: Sequence[bool] = (), ts: float = 0.0
    ) -> list[Firing]:
        """Count clicks attributed to each variant's impressions; feed each click's hit (its
        item was in a list served to its user) observed up to event time ``ts``."""
        self._clicked.update(clicks)
        return self.monitor.update_many("top_n_hit", map(float, hits), ts)

    def observe_impressions(self, shown: Mapping[str, int], ts: float) -> list[Firing]:
        """Count each variant's impressions; each time a variant has had
        ``impressions_window`` of them, feed its click-through over that window, the clicks
        attributed meanwhile over the impressions (clicks come within the attribution window,
        so a window's CTR counts some clicks on the window before: the ratio stays level
        while behaviour does)."""
        fired: list[Firing] = []
        for variant, n in shown.items():
            self._shown[variant] += n
            if self._shown[variant] >= self.impressions_window:
                ctr = self._clicked.pop(variant, 0) / self._shown.pop(variant)
                fired += self.monitor.update(ctr_signal(variant), ctr, ts)
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
