"""Redis key layout: every key under one configurable prefix, one concept per key family.

The same layout serves a single Redis and Redis Cluster. Cluster places a key by the part of its
name between the first ``{`` and the next ``}`` (its hash tag), so:

* a user's keys (vector, history, rating records, impressions shown) share the tag ``{u:<id>}``,
  and a script reading a user's whole state touches one slot;
* an item's keys (vector, neighbour list, rating pairs) share ``{i:<id>}``;
* the per-item statistics that scripts read together (occurrences, popularity, first seen,
  impressions, clicks, rating counts, change stamps, activity, retirements) share
  ``{<prefix>:items}``: one slot, a node's worth of load, as every sorted set is anyway;
* the offset watermarks share ``{<prefix>:wm}``.

The kind letter inside the tag keeps it non-empty whatever the id (an id starting with ``}``
would otherwise leave an empty tag, and Cluster would hash the whole name). Every other key is
single and placed on its own.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Names of the keys that hold freshrec's state under ``prefix``."""

    prefix: str = "fr"

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError(f"a key prefix may not hold braces (hash tags): {self.prefix!r}")

    def _user(self, family: str, user_id: str) -> str:
        return f"{self.prefix}:{family}:{{u:{user_id}}}"

    def _item(self, family: str, item_id: str) -> str:
        return f"{self.prefix}:{family}:{{i:{item_id}}}"

    def _items_stat(self, name: str) -> str:
        return f"{self.prefix}:{{{self.prefix}:items}}:{name}"

    def item_key_parts(self, family: str) -> tuple[str, str]:
        """(head, tail) of an item's key of ``family`` ("mf", "cf", "rp"): a script forms the key
        of any item as head .. id .. tail."""
        head, tail = self._item(family, "\0").split("\0")
        return head, tail

    def user_vector(self, user_id: str) -> str:
        return self._user("mf", user_id)

    def item_vector(self, item_id: str) -> str:
        return self._item("mf", item_id)

    @property
    def rating_mean(self) -> str:
        """Hash {sum, n}: the running global mean rating mu."""
        return f"{self.prefix}:mf:mean"

    def rating_history(self, user_id: str) -> str:
        """List of the user's rating records, newest first (`freshrec.models.rating_stack`)."""
        return self._user("rated", user_id)

    def rating_pairs(self, item_id: str) -> str:
        """Hash partner -> the pair's rating statistics from ``item_id``'s side (4 float32)."""
        return self._item("rp", item_id)

    @property
    def item_ratings(self) -> str:
        """Sorted set item -> number of ratings learned (the co-rating kNN's norms)."""
        return self._items_stat("rcount")

    @property
    def rating_blend(self) -> str:
        """The rating blend's state (G, m) as packed float64: what every worker adds to."""
        return f"{self.prefix}:mf:blend"

    def event_ids(self, user_id: str) -> str:
        """Sorted set event id -> event time: the user's newest ids, to drop a repeated event."""
        return self._user("ids", user_id)

    def history(self, user_id: str) -> str:
        """Sorted set item -> last interaction time: recency window, seen filter, recall seeds."""
        return self._user("hist", user_id)

    def neighbours(self, item_id: str) -> str:
        """Sorted set item -> forward-decayed co-occurrence weight with ``item_id``."""
        return self._item("cf", item_id)

    @property
    def occurrences(self) -> str:
        """Sorted set item -> forward-decayed count of interactions (cosine norms)."""
        return self._items_stat("occ")

    @property
    def popularity(self) -> str:
        """Sorted set item -> forward-decayed, type-weighted interactions (trending)."""
        return self._items_stat("pop")

    @property
    def impressions(self) -> str:
        """Sorted set item -> number of times the item was shown."""
        return self._items_stat("imp")

    @property
    def impressions_total(self) -> str:
        """Float counter: all impressions, N in the UCB bonus."""
        return f"{self.prefix}:imp:total"

    @property
    def clicks(self) -> str:
        """Sorted set item -> number of clicks (CTR, UCB reward)."""
        return self._items_stat("clk")

    def watermark(self, partition: str) -> str:
        """Highest offset of ``partition`` (``topic/n``) whose events are applied. All
        partitions' marks share the tag ``{<prefix>:wm}``: a worker reads its partitions' marks
        in one ``MGET``, on Cluster too."""
        return f"{self.prefix}:{{{self.prefix}:wm}}:{partition}"

    @property
    def built_from_log(self) -> str:
        """Wall time (unix s) a worker found the state empty and began it from the earliest
        offsets Kafka held: while it exists, a partition with no watermark starts there too.
        In the watermarks' slot, outside the pattern of their names."""
        return f"{self.prefix}:{{{self.prefix}:wm}}.from-log"

    @property
    def item_first_seen(self) -> str:
        """Sorted set item -> event time of its first interaction (catalog, item age)."""
        return self._items_stat("first")

    @property
    def unavailable(self) -> str:
        """Set of items that must not be served (out of stock, withdrawn)."""
        return f"{self.prefix}:unavailable"

    @property
    def click_model_state(self) -> str:
        """Hash: the fine ranker's mergeable state (FTRL sums per feature, intercept, counts)."""
        return f"{self.prefix}:ranker:state"

    @property
    def choice_ranker_state(self) -> str:
        """Hash: the choice ranker's mergeable state (summed weight and AdaGrad terms, count)."""
        return f"{self.prefix}:ranker:choices"

    def shown(self, user_id: str) -> str:
        """Hash item -> impression record (features, variant), for attributing a later click."""
        return self._user("shown", user_id)

    @property
    def updated_items(self) -> str:
        """Sorted set item -> when its vector or statistics last changed (server clock):
        readers fetch the item's row again."""
        return self._items_stat("updated")

    @property
    def relisted_items(self) -> str:
        """Sorted set item -> when its neighbour list last changed (server clock): readers
        read the list again when a request next needs it. Kept apart from `updated_items`
        because one event changes the lists of every item it pairs with, up to a hundred,
        and the rows of only its own."""
        return self._items_stat("relisted")

    @property
    def active_items(self) -> str:
        """Sorted set item -> when anything about it was last written (server clock): what
        retention reads to find the items idle for longer than the item TTL."""
        return self._items_stat("active")

    @property
    def retired_items(self) -> str:
        """Sorted set item -> when retention removed it (server clock): readers drop it.
        Records are kept for the item TTL."""
        return self._items_stat("retired")

    @property
    def retired_horizon(self) -> str:
        """Float: the newest retirement record forgotten. A reader that has not seen every
        record up to it has missed a retirement and loads its snapshot again."""
        return self._items_stat("retired:horizon")

    @property
    def dirty_users(self) -> str:
        """Sorted set user -> when a batch first touched them since their list was published."""
        return f"{self.prefix}:dirty"

    @property
    def decay_landmark(self) -> str:
        return f"{self.prefix}:decay:landmark"

    @property
    def decay_rebase_lock(self) -> str:
        """Set while a worker rescales the forward-decayed sums to a new landmark."""
        return f"{self.prefix}:decay:landmark:lock"

    @property
    def decay_rate(self) -> str:
        """Float: the rate (1/s) the forward-decayed sums grow at, set with the first landmark.

        The state's own, so a reader takes it from here and a worker configured with another
        half-life refuses the state rather than mix two rates in one sum.
        """
        return f"{self.prefix}:decay:rate"

    @property
    def event_clock(self) -> str:
        """Float: the newest event time any batch has applied, the state's clock (unix s).

        Time-dependent quantities (impression times, what is "now" for decayed statistics) are
        taken at this clock, not the wall clock, so a replayed log builds the same state.
        """
        return f"{self.prefix}:clock"

    @property
    def drift_firings(self) -> str:
        """List of JSON drift firings, newest first, trimmed to the latest 100."""
        return f"{self.prefix}:drift:firings"

    @property
    def worker_stats(self) -> str:
        return f"{self.prefix}:stats:worker"
