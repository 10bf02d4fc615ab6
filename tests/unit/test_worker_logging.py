"""The worker's Faust `Worker` logs at the level it is given, and no lower, without servers."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import faust
import pytest

from freshrec.streams.worker import faust_worker


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.mark.parametrize("loglevel", ["info", "warning", "error"])
def test_a_worker_builds_no_records_below_its_level(
    root_logger: logging.Logger, loglevel: str
) -> None:
    """At WARNING and above Faust's terminal spinner would set the root logger to DEBUG, so
    every debug call of aiokafka and the rest would build a record only to drop it."""
    worker = faust_worker(faust.App(f"logging-{loglevel}", broker="kafka://127.0.0.1:1"), loglevel)
    worker.redirect_stdouts = False  # pytest keeps its own stdout
    worker._setup_logging()  # what the worker does as it starts
    assert root_logger.level == getattr(logging, loglevel.upper())
    assert not logging.getLogger("aiokafka.consumer.fetcher").isEnabledFor(logging.DEBUG)
