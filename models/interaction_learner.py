"""Every model learns a batch of interactions from one snapshot of the state it touches.

A store reads a snapshot (the vectors of the batch's users and items, the users' histories,
the rating mean, the decay landmark), `InteractionLearner` learns the batch from it and
returns the changes, aggregated per key, for the store to add to what it holds. Nothing here
does I/O, so the learning is the same whichever store, and testable without one.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from freshrec.models.biased_mf import BiasedMF
from freshrec.models.config import ModelConfig
from freshrec.models.cooccurrence import Cooccurrence
from freshrec.models.decay import ForwardDecay
from freshrec.models.implicit_mf import ImplicitMF, draw_negatives
from freshrec.models.learned_pairs import PairRows
from freshrec.models.mf import VectorTable
from freshrec.models.popularity import Popularity
from freshrec.models.rating_stack import Blend, RatingRecord, RatingStack

INTERACTIONS = frozenset(("click", "view", "purchase", "rating"))
"""The event types the models learn from; an impression only counts toward its item's CTR."""


class Interaction(Protocol):
    type: str
    user_id: str
    item_id: str
    ts: float
    value: float | None


@dataclass
class Snapshot:
    """Everything learning a batch reads.

    ``vectors`` are full rows by name (``"u:<user>"``, ``"i:<item>"``); a row not in it starts
    at its initial vector. ``histories`` are users' most recent distinct items (up to the
    config's ``cooccurrence_history``), most recent first; a user not in it has none. The rating
    side (`freshrec.models.rating_stack`): ``ratings`` are users' rating records, newest first;
    ``rating_pairs`` item -> its stored pairs (partners and statistics) with the items a rating
    of the batch meets in its user's records; ``item_ratings`` the rating counts of those
    items; and ``blend`` the blend's state (None: its prior). Learning leaves the snapshot
    unchanged.
    """

    landmark: float
    mean_sum: float = 0.0
    mean_n: int = 0
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    histories: dict[str, list[str]] = field(default_factory=dict)
    ratings: dict[str, list[RatingRecord]] = field(default_factory=dict)
    rating_pairs: dict[str, PairRows] = field(default_factory=dict)
    item_ratings: dict[str, float] = field(default_factory=dict)
    blend: np.ndarray | None = None


@dataclass
class Changes:
    """Everything learning a batch changes, aggregated per key, as amounts to add.

    Vectors change by ``deltas[name]`` from ``bases[name]`` (the snapshot's row, or its
    initial vector); forward-decayed sums (``pairs``, ``occurrences``, ``popularity``) are at
    the snapshot's landmark. ``first_seen`` and ``history`` hold the earliest and latest event
    time per item (and user). ``rating_records`` are each user's new records, oldest first;
    ``rating_pairs``, ``item_ratings`` and ``blend`` amounts to add. ``rating_errors`` are the
    prequential errors (of the blend, what is served), not state.
    """

    deltas: dict[str, np.ndarray] = field(default_factory=dict)
    bases: dict[str, np.ndarray] = field(default_factory=dict)
    mean_sum: float = 0.0
    mean_n: int = 0
    pairs: defaultdict[str, defaultdict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    occurrences: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    popularity: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    clicks: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    impressions: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    first_seen: dict[str, float] = field(default_factory=dict)
    history: defaultdict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    rating_records: dict[str, list[RatingRecord]] = field(default_factory=dict)
    rating_pairs: dict[str, PairRows] = field(default_factory=dict)
    item_ratings: dict[str, float] = field(default_factory=dict)
    blend: np.ndarray | None = None
    rating_errors: list[float] = field(default_factory=list)


class InteractionLearner:
    """Biased MF, implicit MF, co-occurrence, popularity and history, learned in one pass.

    The events are learned *sequentially*, each by every model it concerns, so an item that
    appears twice in a batch sees its own first update, exactly as one-event-at-a-time
    learners would:

    * a rating: its prequential error :math:`r - \\hat r` (predicted by the `RatingStack`
      before anything about it is learned), then the stack learns it (one `BiasedMF` step, the
      blend, the user's rating record and the pair statistics with the user's earlier ratings);
    * every interaction: one `ImplicitMF` step with its type's strength and negatives drawn
      from the batch's items, then `Cooccurrence` with the user's history and `Popularity`
      weighted by the strength, both at the snapshot's landmark; the user's history and the
      item's first-seen time;
    * a click also counts toward the item's clicks, an impression only toward its impressions.

    The negatives of a whole batch are drawn in one call of a generator seeded by
    ``config.seed`` and kept across batches, so the same batches draw the same negatives.

    Parameters
    ----------
    config
        Hyperparameters of every model.

    Examples
    --------
    >>> from collections import namedtuple
    >>> Event = namedtuple("Event", "type user_id item_id ts value")
    >>> learner = InteractionLearner(ModelConfig(factors=2))
    >>> batch = [  # all at the landmark, so every forward-decay weight is 1
    ...     Event("view", "ann", "dune", 100.0, None),
    ...     Event("rating", "ann", "heat", 100.0, 4.0),
    ...     Event("impression", "bob", "dune", 100.0, None),
    ...     Event("click", "bob", "dune", 100.0, None),
    ... ]
    >>> changes = learner.learn_many(batch, Snapshot(landmark=100.0))
    >>> dict(changes.pairs["dune"]), dict(changes.popularity)
    ({'heat': 1.0}, {'dune': 1.5, 'heat': 1.0})
    >>> dict(changes.impressions), dict(changes.clicks), changes.mean_sum, changes.mean_n
    ({'dune': 1.0}, {'dune': 1.0}, 4.0, 1)
    >>> sorted(changes.deltas), [round(e, 2) for e in changes.rating_errors]  # r - mu
    (['i:dune', 'i:heat', 'u:ann', 'u:bob'], [4.0])
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def learn_many(self, events: Sequence[Interaction], snapshot: Snapshot) -> Changes:
        """Learns ``events`` in order from ``snapshot``; returns what changed.

        Raises ``ValueError`` when an event is too far past the snapshot's landmark for its
        forward-decay weight (the stored sums must be rebased first).
        """
        cfg = self.config
        newest = max((e.ts for e in events if e.type in INTERACTIONS), default=None)
        if newest is not None and ForwardDecay(cfg.decay_rate, snapshot.landmark).needs_rebase(
            newest
        ):
            raise ValueError(
                f"events reach past the forward-decay range of landmark {snapshot.landmark}: "
                "rebase the stored sums to a later landmark before learning them"
            )
        rows = {name: vec.copy() for name, vec in snapshot.vectors.items()}
        table = VectorTable(cfg.factors, cfg.init_std, cfg.seed, rows)
        rating = BiasedMF(
            table,
            cfg.lr,
            cfg.reg,
            snapshot.mean_sum,
            snapshot.mean_n,
            cfg.bias_lr,
            cfg.bias_shrinkage,
        )
        stack = RatingStack(
            rating,
            snapshot.ratings,
            snapshot.rating_pairs,
            snapshot.item_ratings,
            Blend.prior_state() if snapshot.blend is None else snapshot.blend,
            cfg.rating_history,
            cfg.rating_pairs_window,
        )
        implicit = ImplicitMF(table, cfg.implicit_lr, cfg.reg, cfg.implicit_alpha, seed=self.rng)
        histories = {user: list(items) for user, items in snapshot.histories.items()}
        cooccurrence = Cooccurrence(
            cfg.cooccurrence_history,
            cfg.decay_rate,
            snapshot.landmark,
            histories,
            cfg.cooccurrence_gap_exponent,
        )
        popularity = Popularity(cfg.decay_rate, snapshot.landmark)
        out = Changes(pairs=cooccurrence.pairs, occurrences=cooccurrence.occurrences)
        out.popularity = popularity.scores

        pool = sorted({e.item_id for e in events if e.type in INTERACTIONS})
        picks = draw_negatives(self.rng, len(pool), len(events), cfg.implicit_negatives).tolist()
        steps: list[tuple[str, str, float, int]] = []
        for n, ev in enumerate(events):
            item = ev.item_id
            if ev.type == "impression":
                out.impressions[item] += 1.0
                continue
            user = ev.user_id
            strength = cfg.strengths.get(ev.type, 1.0)
            if ev.type == "rating":
                value = float(ev.value)  # type: ignore[arg-type]
                out.rating_errors.append(stack.learn_one(user, item, value))
            elif ev.type == "click":
                out.clicks[item] += 1.0
            steps.append((user, item, strength, n))
            cooccurrence.learn_one(user, item, ev.ts)
            popularity.learn_one(item, ev.ts, strength)
            seen = out.history[user]
            seen[item] = max(ev.ts, seen.get(item, -math.inf))
            out.first_seen[item] = min(ev.ts, out.first_seen.get(item, math.inf))

        # Implicit steps move only implicit parts, which nothing above reads: they can follow.
        if steps:
            users, items, strengths, rows = zip(*steps, strict=True)
            negatives = [[pool[pick] for pick in picks[n]] for n in rows]
            implicit.learn_steps(users, items, strengths, negatives)
        for name, vec in table.items():
            base = snapshot.vectors.get(name)
            if base is None:
                base = table.initial(name)
            delta = vec - base
            if delta.any():
                out.deltas[name] = delta
                out.bases[name] = base
        out.mean_sum = rating.mean_sum - snapshot.mean_sum
        out.mean_n = rating.mean_n - snapshot.mean_n
        if stack.new_records:
            out.rating_records = dict(stack.new_records)
            out.rating_pairs = stack.pair_changes
            out.item_ratings = dict(stack.rating_increments)
            out.blend = stack.blend_change()
        return out
