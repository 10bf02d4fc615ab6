"""The producer's partition choice must equal Kafka's, or per-user order breaks."""

from __future__ import annotations

import pytest

from freshrec.streams.partitioner import murmur2, partition_for


@pytest.mark.parametrize(
    ("data", "expected"),
    [  # the vectors of Kafka's own UtilsTest
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_matches_kafka(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


def test_partition_is_stable_and_in_range() -> None:
    parts = [partition_for(f"user-{n}", 7) for n in range(1000)]
    assert all(0 <= p < 7 for p in parts)
    assert len(set(parts)) == 7
    assert parts == [partition_for(f"user-{n}", 7) for n in range(1000)]
