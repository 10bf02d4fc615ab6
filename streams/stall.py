"""Whether a worker's consumer has stopped handing it the messages of its partitions.

A Kafka consumer can go quiet while it still holds its partitions: a rebalance whose recovery
never resumed the paused partitions, a fetcher that stopped after a broker came back. The
group sees a live member, so nothing reassigns the partitions, and the worker learns nothing
more while it looks healthy. `StallWatch` tells that state apart from a busy or an idle one,
in the manner of a lag monitor's rule (LinkedIn's Burrow: a consumer whose offsets stop moving
while its lag is not zero is stalled), from what the worker sees every few seconds:

- each owned partition's end offset, asked of the broker (not taken from the consumer's own
  fetches, which are what may have stopped);
- the next offset still to come: past the last message its agent took, or the consumer's
  fetch position, whichever is further (a fetch position past a transaction's commit marker
  counts the marker as read, which no agent ever takes);
- whether a Redis step is running or being retried: a slow or blocked batch is the failure
  policy's business, not a stall.

A partition is stalled when messages wait in it (end > next) and ``limit_s`` have passed
since it was last seen caught up, moving, or with a step running. A partition seen anew (after
a rebalance) starts its clock again.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass


@dataclass
class _Progress:
    next_offset: int
    since: float


class StallWatch:
    """Per-partition clocks of the last progress; `observe` names the stalled partitions."""

    def __init__(self, limit_s: float) -> None:
        if not limit_s > 0:
            raise ValueError(f"the stall limit must be positive seconds, got {limit_s}")
        self.limit_s = limit_s
        self._progress: dict[Hashable, _Progress] = {}

    def observe(
        self,
        now: float,
        ends: Mapping[Hashable, int],
        nexts: Mapping[Hashable, int],
        busy: bool,
    ) -> list[Hashable]:
        """The partitions stalled at ``now`` (monotonic seconds), among those owned now: the
        keys of both ``ends`` (end offsets) and ``nexts`` (next offsets to come). ``busy``: a
        Redis step is running, so every clock starts again."""
        owned = ends.keys() & nexts.keys()
        for gone in self._progress.keys() - owned:
            del self._progress[gone]
        stalled = []
        for tp in owned:
            end, next_offset = ends[tp], nexts[tp]
            seen = self._progress.get(tp)
            if seen is None or busy or end <= next_offset or next_offset != seen.next_offset:
                self._progress[tp] = _Progress(next_offset, now)
            elif now - seen.since >= self.limit_s:
                stalled.append(tp)
        return stalled

    def waited_s(self, now: float, tp: Hashable) -> float:
        """How long partition ``tp``'s next offset has not moved (0 if it is not watched)."""
        seen = self._progress.get(tp)
        return 0.0 if seen is None else now - seen.since
