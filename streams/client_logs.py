"""The Kafka client's errors during a broker outage, logged at a bounded rate.

aiokafka logs every failed connection attempt, metadata update, fetch and coordinator lookup at
ERROR, tens of lines a second for as long as the broker is down (some 3,600 lines in a 40 s
restart). The worker waits such an outage out by itself, so one line per kind of message per
interval, with the number held back, says as much without flooding the log.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable


class RepeatLimit(logging.Filter):
    """Lets a message through at most once per ``every_s`` per logger, level and template
    (``record.msg`` before its arguments: another node id is the same message); the next one
    let through says how many were held back.

    Examples
    --------
    >>> now = [0.0]
    >>> limit = RepeatLimit(10.0, clock=lambda: now[0])
    >>> def record() -> logging.LogRecord:
    ...     args = ("broker", 1)
    ...     return logging.LogRecord("k", logging.ERROR, "", 0, "cannot reach %s %d", args, None)
    >>> [limit.filter(record()) for _ in range(3)]
    [True, False, False]
    >>> now[0] = 10.0
    >>> later = record()
    >>> limit.filter(later), later.getMessage()
    (True, 'cannot reach broker 1 (2 more like it held back in 10 s)')
    """

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        last, held = self._seen.get(key, (-math.inf, 0))
        if now - last < self.every_s:
            self._seen[key] = (last, held + 1)
            return False
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like it held back in {now - last:.0f} s)"
        return True


def limit_kafka_client_logs(every_s: float) -> RepeatLimit:
    """Put a `RepeatLimit` on every logger of aiokafka (the Faust worker's Kafka client)."""
    import aiokafka  # noqa: F401  (its modules create their loggers when imported)

    limit = RepeatLimit(every_s)
    for name in list(logging.root.manager.loggerDict):
        if name == "aiokafka" or name.startswith("aiokafka."):
            logging.getLogger(name).addFilter(limit)
    return limit
