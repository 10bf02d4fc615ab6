"""What the reader shows of the catalogue: coverage, cold-item exposure, concentration.

Counting is per request and cheap (a counter update over the ``k`` item ids of each list);
the ratios are computed when Prometheus scrapes. Every series is a fixed, unlabelled number, so
the metrics stay the same size however many users and items there are.

- ``freshrec_served_items_total`` and ``freshrec_served_cold_items_total``: every item shown,
  and those shown from the cold pool or an exploration slot; their rates' ratio is the
  exposure share of cold items.
- ``freshrec_catalogue_items``: items in the reader's snapshot.
- ``freshrec_catalogue_coverage_ratio``: distinct items shown in the last window (between one
  and two `WINDOW_S`) over the items in the snapshot.
- ``freshrec_exposure_gini``: Gini coefficient of how often each catalogue item was shown in
  that window (0: every item equally, towards 1: a few items get everything), the popularity
  concentration of what is served.

Each reader replica reports its own share of the traffic.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable

import numpy as np
from prometheus_client import Counter, Gauge

WINDOW_S = 300.0
COLD_CHANNELS = frozenset(("cold", "explore"))

SERVED_ITEMS = Counter("freshrec_served_items_total", "Items shown in served lists")
SERVED_COLD_ITEMS = Counter(
    "freshrec_served_cold_items_total",
    "Items shown from the cold pool of new items or in an exploration slot",
)
CATALOGUE_ITEMS = Gauge("freshrec_catalogue_items", "Items in the reader's snapshot")
COVERAGE = Gauge(
    "freshrec_catalogue_coverage_ratio",
    "Distinct items shown in the last 5-10 minutes over the items in the snapshot",
)
EXPOSURE_GINI = Gauge(
    "freshrec_exposure_gini",
    "Gini coefficient of the items' exposure in the last 5-10 minutes, over the catalogue",
)


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts: ``Σ (2i − n − 1) x_(i) / (n Σ x)``, sorted.

    >>> gini(np.array([5, 5, 5, 5]))
    0.0
    >>> round(gini(np.array([0, 0, 0, 12])), 3)
    0.75
    """
    n = len(counts)
    total = float(counts.sum()) if n else 0.0
    if total <= 0:
        return 0.0
    ranked = np.sort(counts.astype(np.float64))
    weights = 2 * np.arange(1, n + 1) - n - 1
    return float(weights @ ranked / (n * total))


class ExposureMeter:
    """Counts what is shown, in two rotating windows, for the catalogue gauges.

    Parameters
    ----------
    catalogue_size
        How many items the catalogue holds now (the reader's snapshot).
    window_s
        The window's length; the gauges cover the current window and the one before.
    clock
        Monotonic seconds (for tests).

    Examples
    --------
    >>> meter = ExposureMeter(lambda: 4, clock=lambda: 0.0)
    >>> meter.record(["a", "b"], [["cf"], ["cold"]])
    >>> meter.record(["a"], [["mf"]])
    >>> meter.coverage()
    0.5
    >>> round(meter.concentration(), 3)
    0.583
    """

    def __init__(
        self,
        catalogue_size: Callable[[], int],
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalogue_size = catalogue_size
        self.window_s = window_s
        self.clock = clock
        self.current: collections.Counter[str] = collections.Counter()
        self.previous: collections.Counter[str] = collections.Counter()
        self.started = clock()
        # Scrapes on the reader's own metrics port compute the gauges on the metrics server's
        # thread while requests record on the event loop's.
        self._lock = threading.Lock()

    def record(self, item_ids: list[str], channels: Iterable[list[str]]) -> None:
        """One served list: its item ids and each item's channels."""
        with self._lock:
            self._rotate()
            self.current.update(item_ids)
        SERVED_ITEMS.inc(len(item_ids))
        cold = sum(1 for names in channels if not COLD_CHANNELS.isdisjoint(names))
        if cold:
            SERVED_COLD_ITEMS.inc(cold)

    def coverage(self) -> float:
        """Distinct items shown in the window over the catalogue (0 for an empty catalogue)."""
        with self._lock:
            self._rotate()
            shown = len(self.current.keys() | self.previous.keys())
        size = self.catalogue_size()
        if size <= 0:
            return 0.0
        return min(1.0, shown / size)

    def concentration(self) -> float:
        """Gini of exposure over the catalogue, the items never shown counted as zeros."""
        with self._lock:
            self._rotate()
            shown = self.current + self.previous
        counts = np.fromiter(shown.values(), dtype=np.float64, count=len(shown))
        unseen = max(0, self.catalogue_size() - len(counts))
        return gini(np.concatenate([counts, np.zeros(unseen)]))

    def export(self) -> None:
        """Point the process's catalogue gauges at this meter (computed at each scrape)."""
        CATALOGUE_ITEMS.set_function(lambda: float(self.catalogue_size()))
        COVERAGE.set_function(self.coverage)
        EXPOSURE_GINI.set_function(self.concentration)

    def _rotate(self) -> None:
        now = self.clock()
        if now - self.started < self.window_s:
            return
        # Two windows or more have gone by without a list: nothing shown is recent.
        self.previous = (
            self.current if now - self.started < 2 * self.window_s else collections.Counter()
        )
        self.current = collections.Counter()
        self.started = now
