"""Whether a worker's consumer has stopped handing it the messages of its partitions.

A Kafka consumer can go quiet while it keeps its partitions: its fetcher task dies (a seek
from another thread once killed aiokafka's), or a rebalance's recovery leaves the partitions
paused. The member still heartbeats, so the group reassigns nothing, and the worker learns
nothing while it looks alive. `StallWatch` tells that state apart from a busy or an idle one,
by the rule of LinkedIn's Burrow for a stalled consumer (its offsets stop moving while its
lag is not zero), from what the worker reads every few seconds:

- each owned partition's end offset, asked of the broker (one request in flight at most, so
  a broker away never piles requests up on the consumer's thread);
- the partition's next offset (`watched_offset`): the next one the worker has to take (past
  the last message its agent took, else where the partition resumed: past its offset
  watermark, or the earliest offset of a state built from the log), or, when the agent has
  taken every message Faust handed it from the partition, the consumer's fetch position if
  further (past every record Faust took from it, control records included);
- whether the worker is busy: a Redis step running for longer than a tick or being retried
  (the failure policy's business), or a rebalance in progress (for a bounded time).

A partition is stalled when messages wait in it (end > next) and ``limit_s`` have passed since
it was last seen moving or with the worker busy, or first seen with messages waiting after a
tick that saw it caught up. Messages that arrive in an idle partition have thus waited between
``limit_s`` and ``limit_s`` plus a tick, however late a tick comes on a loaded machine; a
clock started at the tick that last saw the partition caught up would count the time before
they arrived. A partition seen anew (after a rebalance) starts its clock again, and so does
every partition after a tick whose offsets could not be read.

A producer writing in transactions leaves a commit marker after each transaction's last
message: an offset that no agent takes, so the next offset to take alone would stay behind the
end of an idle partition for good. The fetch position steps over the marker. It is followed
only while Faust holds nothing of the partition for the agent: past the records Faust took
from the consumer, up to thousands of messages can wait in its stream buffers, and an agent
that stopped taking them must still be seen. A consumer that stops fetching keeps its
position too, so either way the watch sees it. A partition without a watermark that resumed
from the group's commits is watched once its agent has taken a message: where Faust sought
it is not known here.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass


@dataclass
class _Progress:
    next_offset: int
    since: float
    waiting: bool


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
        keys of both ``ends`` (end offsets) and ``nexts`` (next offsets to take). ``busy``:
        the worker is busy, so every clock starts again."""
        owned = ends.keys() & nexts.keys()
        for gone in self._progress.keys() - owned:
            del self._progress[gone]
        stalled = []
        for tp in owned:
            end, next_offset = ends[tp], nexts[tp]
            seen = self._progress.get(tp)
            waiting = end > next_offset
            if (
                seen is None
                or busy
                or not waiting
                or not seen.waiting
                or next_offset != seen.next_offset
            ):
                self._progress[tp] = _Progress(next_offset, now, waiting)
            elif now - seen.since >= self.limit_s:
                stalled.append(tp)
        return stalled

    def forget(self) -> None:
        """Start every clock again at the next observation: what happened between two
        observations is unknown (the offsets could not be read, the broker was away)."""
        self._progress.clear()

    def waited_s(self, now: float, tp: Hashable) -> float:
        """How long partition ``tp``'s next offset has not moved (0 if it is not watched)."""
        seen = self._progress.get(tp)
        return 0.0 if seen is None else now - seen.since


def watched_offset(
    processed: int | None,
    resumed: int | None,
    sought: int | None,
    handed: int | None,
    fetched: int | None,
) -> int | None:
    """The offset the watch follows for one partition (None: not watched yet).

    ``processed``: past the last message the agent took since the partition was assigned;
    ``resumed``: where its messages resume, when known; ``sought``: the offset the worker
    committed for Faust's seek to the commits, when it did; ``handed``: Faust's read offset,
    the offset of the last message it handed to the agent's stream or of its last seek;
    ``fetched``: the consumer's fetch position, when it has one.

    Nothing is held for the agent when every message handed on was taken: the read offset
    is below the next to take, or nothing was taken and it is still where the seek put it.
    One message handed at exactly that offset and never taken looks the same, and is seen
    only once another one waits behind it.
    """
    taken = processed if processed is not None else resumed
    if fetched is None:
        return taken
    if handed is None:  # no seek past offset 0 and nothing handed
        held = False
    elif processed is not None:
        held = handed >= processed
    else:  # nothing taken: a seek to an offset not committed here (the group's) is unknown
        held = sought is None or handed != sought
    if held:
        return taken
    return fetched if taken is None else max(taken, fetched)
