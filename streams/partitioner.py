"""Kafka's default partitioner (murmur2 of the key), bit-for-bit as the Java client does it.

The producer helper batches the events of many users into one message per partition; knowing
the partition in Python keeps every user's events on the partition a plain keyed send would
use, so per-user order holds whichever way an event is sent.
"""

from __future__ import annotations

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """32-bit murmur2 with Kafka's seed, as a signed int like ``Utils.murmur2``.

    Examples
    --------
    >>> murmur2(b"21"), murmur2(b"foobar")
    (-973932308, -790332482)
    """
    length = len(data)
    h = (0x9747B28C ^ length) & _MASK
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length % 4
    if tail == 3:
        h ^= data[whole + 2] << 16
    if tail >= 2:
        h ^= data[whole + 1] << 8
    if tail >= 1:
        h ^= data[whole]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: str, partitions: int) -> int:
    """``toPositive(murmur2(key)) % partitions``, Kafka's choice for a keyed record."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions
