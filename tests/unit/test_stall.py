"""The stall watch: messages waiting in an owned partition that its consumer stopped handing
over, told apart from an idle partition, a busy worker and a rebalance."""

from __future__ import annotations

import pytest

from freshrec.streams.stall import StallWatch, watched_offset

P0, P1 = ("events", 0), ("events", 1)


def test_waiting_messages_with_no_progress_stall_the_partition_after_the_limit() -> None:
    watch = StallWatch(limit_s=60)
    assert watch.observe(0, {P0: 1, P1: 0}, {P0: 0, P1: 0}, busy=False) == []
    assert watch.observe(59, {P0: 1, P1: 0}, {P0: 0, P1: 0}, busy=False) == []
    assert watch.waited_s(59, P0) == 59
    assert watch.observe(60, {P0: 1, P1: 0}, {P0: 0, P1: 0}, busy=False) == [P0]


def test_progress_starts_the_clock_again_and_a_caught_up_partition_never_stalls() -> None:
    watch = StallWatch(limit_s=60)
    for t in range(0, 300, 5):  # a steady flow: new messages, and each tick takes some
        assert watch.observe(t, {P0: t + 10}, {P0: t + 3}, busy=False) == []
    for t in range(300, 600, 5):  # idle: nothing waits, however long
        assert watch.observe(t, {P0: 300}, {P0: 300}, busy=False) == []
    # A message arrives: the clock runs from the first tick that sees it wait.
    assert watch.observe(600, {P0: 301}, {P0: 300}, busy=False) == []
    assert watch.observe(659, {P0: 301}, {P0: 300}, busy=False) == []
    assert watch.observe(660, {P0: 301}, {P0: 300}, busy=False) == [P0]


def test_messages_that_arrive_just_before_a_late_tick_are_given_the_whole_limit() -> None:
    """Ticks every 5 s with a limit of 6 s, and one tick late on a loaded machine: messages
    that arrived a moment before it have not waited the limit, whatever the last caught-up
    tick's age."""
    watch = StallWatch(limit_s=6)
    assert watch.observe(0, {P0: 22}, {P0: 22}, busy=False) == []  # caught up
    assert watch.observe(6.5, {P0: 29}, {P0: 22}, busy=False) == []  # 7 arrived at 6.4
    assert watch.observe(11.5, {P0: 29}, {P0: 22}, busy=False) == []
    assert watch.observe(16.5, {P0: 29}, {P0: 22}, busy=False) == [P0]
    assert watch.waited_s(16.5, P0) == 10


def test_a_running_or_retried_redis_step_is_not_a_stall() -> None:
    watch = StallWatch(limit_s=60)
    for t in range(0, 120, 5):
        assert watch.observe(t, {P0: 50}, {P0: 10}, busy=True) == []
    assert watch.observe(174, {P0: 50}, {P0: 10}, busy=False) == []  # last busy at 115
    assert watch.observe(175, {P0: 50}, {P0: 10}, busy=False) == [P0]


def test_a_partition_seen_anew_starts_its_clock_again_and_a_revoked_one_is_forgotten() -> None:
    watch = StallWatch(limit_s=60)
    watch.observe(0, {P0: 5, P1: 5}, {P0: 0, P1: 0}, busy=False)
    assert watch.observe(30, {P1: 5}, {P1: 0}, busy=False) == []  # P0 revoked
    assert watch.waited_s(30, P0) == 0.0
    assert watch.observe(60, {P0: 5, P1: 5}, {P0: 0, P1: 0}, busy=False) == [P1]
    assert watch.observe(119, {P0: 5}, {P0: 0}, busy=False) == []
    assert watch.observe(120, {P0: 5}, {P0: 0}, busy=False) == [P0]
    # Only partitions with both offsets are watched (no fetch position yet: not yet).
    assert watch.observe(500, {P0: 5, P1: 9}, {P0: 0}, busy=False) == [P0]


def test_the_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        StallWatch(limit_s=0)


def test_a_tick_without_offsets_starts_every_clock_again() -> None:
    """The broker away for longer than the limit: the consumer gets the limit to resume."""
    watch = StallWatch(limit_s=60)
    watch.observe(0, {P0: 5}, {P0: 0}, busy=False)
    watch.forget()  # the offsets of the ticks from 5 s to 200 s could not be read
    assert watch.observe(205, {P0: 5}, {P0: 0}, busy=False) == []
    assert watch.observe(264, {P0: 5}, {P0: 0}, busy=False) == []
    assert watch.observe(265, {P0: 5}, {P0: 0}, busy=False) == [P0]


def test_the_fetch_position_counts_only_when_faust_holds_nothing_for_the_agent() -> None:
    # Idle after a transaction: the agent took up to 9, its marker is at 10, the end at 11.
    assert watched_offset(processed=10, resumed=5, sought=5, handed=9, fetched=11) == 11
    # The same after a restart that resumed at 10: nothing handed but the seek to 10.
    assert watched_offset(processed=None, resumed=10, sought=10, handed=10, fetched=11) == 11
    # Resumed past a watermark the log no longer holds: the seek went to the watermark.
    assert watched_offset(processed=None, resumed=30, sought=10, handed=10, fetched=32) == 32
    # Messages 10-20 handed to the stream and not taken: the agent's offset, however far the
    # consumer fetched.
    assert watched_offset(processed=10, resumed=5, sought=5, handed=20, fetched=21) == 10
    assert watched_offset(processed=None, resumed=10, sought=10, handed=12, fetched=13) == 10
    # A state built from the log: the seek to offset 0 leaves a read offset of 0 (or none).
    assert watched_offset(processed=None, resumed=0, sought=0, handed=0, fetched=4) == 4
    assert watched_offset(processed=None, resumed=0, sought=0, handed=None, fetched=4) == 4
    # Resumed from the group's commits alone: the seek's offset is not known here, so it is
    # watched from the fetch position only when nothing was sought or handed.
    assert watched_offset(processed=None, resumed=None, sought=None, handed=None, fetched=7) == 7
    assert watched_offset(processed=None, resumed=None, sought=None, handed=7, fetched=8) is None
    # No fetch position (a partition awaiting its reset): the agent's offset alone.
    assert watched_offset(processed=10, resumed=5, sought=5, handed=9, fetched=None) == 10
    assert watched_offset(None, None, None, None, None) is None
