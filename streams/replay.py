"""Publish events (read from a file of any format of the contract) to the events topic at a
chosen rate."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from freshrec.streams.producer import EventProducer


class Ticker(Protocol):
    """Where progress goes: one ``advance`` per event sent, ``close`` at the end."""

    def advance(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class ReplaySummary:
    events: int
    messages: int
    raw_lines: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / max(self.seconds, 1e-9)


def replay_events(
    events: Iterable[Mapping[str, Any]],
    producer: EventProducer,
    rate: float = 0.0,
    progress: Ticker | None = None,
) -> ReplaySummary:
    """Send events, paced to ``rate`` events/s when given; lines that were not JSON go as-is.

    Pacing sleeps toward a schedule (event n due at n / rate), so the long-run rate is exact
    whatever the per-send cost.
    """
    started = time.monotonic()
    sent = raw = 0
    for event in events:
        if "__raw__" in event:
            producer.send_raw(event["__raw__"])
            raw += 1
        else:
            producer.send(event)
        sent += 1
        if progress is not None:
            progress.advance()
        if rate > 0:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0.001:
                time.sleep(ahead)
    producer.flush()
    if progress is not None:
        progress.close()
    return ReplaySummary(sent, producer.sent_messages, raw, time.monotonic() - started)
