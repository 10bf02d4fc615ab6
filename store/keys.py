"""Redis key layout: every key under one configurable prefix, one concept per key family.

Every write the models make touches one key per command (or a single-key server script), so the
layout works unchanged on Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Names of the keys that hold freshrec's state under ``prefix``."""

    prefix: str = "fr"

    def user_vector(self, user_id: str) -> str:
        return f"{self.prefix}:mf:u:{user_id}"

    def item_vector(self, item_id: str) -> str:
        return f"{self.prefix}:mf:i:{item_id}"

    @property
    def rating_mean(self) -> str:
        """Hash {sum, n}: the running global mean rating mu."""
        return f"{self.prefix}:mf:mean"

    def rating_history(self, user_id: str) -> str:
        """List of the user's rating records, newest first (`freshrec.models.rating_stack`)."""
        return f"{self.prefix}:rated:{user_id}"

    def rating_pairs(self, item_id: str) -> str:
        """Hash partner -> the pair's rating statistics from ``item_id``'s side (4 float32)."""
        return f"{self.prefix}:rp:{item_id}"

    @property
    def item_ratings(self) -> str:
        """Sorted set item -> number of ratings learned (the co-rating kNN's norms)."""
        return f"{self.prefix}:rcount"

    @property
    def rating_blend(self) -> str:
        """The rating blend's state (G, m) as packed float64: what every worker adds to."""
        return f"{self.prefix}:mf:blend"

    def history(self, user_id: str) -> str:
        """Sorted set item -> last interaction time: recency window, seen filter, recall seeds."""
        return f"{self.prefix}:hist:{user_id}"

    def neighbours(self, item_id: str) -> str:
        """Sorted set item -> forward-decayed co-occurrence weight with ``item_id``."""
        return f"{self.prefix}:cf:{item_id}"

    @property
    def occurrences(self) -> str:
        """Sorted set item -> forward-decayed count of interactions (cosine norms)."""
        return f"{self.prefix}:occ"

    @property
    def popularity(self) -> str:
        """Sorted set item -> forward-decayed, type-weighted interactions (trending)."""
        return f"{self.prefix}:pop"

    @property
    def impressions(self) -> str:
        """Sorted set item -> number of times the item was shown."""
        return f"{self.prefix}:imp"

    @property
    def impressions_total(self) -> str:
        """Float counter: all impressions, N in the UCB bonus."""
        return f"{self.prefix}:imp:total"

    @property
    def clicks(self) -> str:
        """Sorted set item -> number of clicks (CTR, UCB reward)."""
        return f"{self.prefix}:clk"

    def watermark(self, partition: str) -> str:
        """Highest offset of ``partition`` (``topic/n``) whose events are applied."""
        return f"{self.prefix}:wm:{partition}"

    @property
    def item_first_seen(self) -> str:
        """Sorted set item -> event time of its first interaction (catalog, item age)."""
        return f"{self.prefix}:items"

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
        return f"{self.prefix}:shown:{user_id}"

    @property
    def updated_items(self) -> str:
        """Sorted set item -> when its vector last changed (readers refresh their matrix)."""
        return f"{self.prefix}:items:updated"

    @property
    def active_items(self) -> str:
        """Sorted set item -> when anything about it was last written (server clock): what
        retention reads to find the items idle for longer than the item TTL."""
        return f"{self.prefix}:items:active"

    @property
    def retired_items(self) -> str:
        """Sorted set item -> when retention removed it (server clock): readers drop it.
        Records are kept for the item TTL."""
        return f"{self.prefix}:items:retired"

    @property
    def retired_horizon(self) -> str:
        """Float: the newest retirement record forgotten. A reader that has not seen every
        record up to it has missed a retirement and loads its snapshot again."""
        return f"{self.prefix}:items:retired:horizon"

    @property
    def dirty_users(self) -> str:
        """Sorted set user -> when a batch first touched them since their list was published."""
        return f"{self.prefix}:dirty"

    @property
    def decay_landmark(self) -> str:
        return f"{self.prefix}:decay:landmark"

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
