"""Publish a file of events (any format of the contract) to the events topic at a chosen rate."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streams.datasets import count_lines, read_events
from streams.producer import EventProducer
from streams.progress import Progress


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
    progress: Progress | None = None,
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


def replay_file(
    path: Path,
    producer: EventProducer,
    rate: float = 0.0,
    fmt: str | None = None,
    show_progress: bool = True,
) -> ReplaySummary:
    progress = Progress(count_lines(path), f"replay {path.name}") if show_progress else None
    return replay_events(read_events(path, fmt), producer, rate=rate, progress=progress)
