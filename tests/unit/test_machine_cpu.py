"""The benchmarks' machine-wide CPU probe, checked against this process's own CPU time."""

from __future__ import annotations

import sys
import time

import pytest

from freshrec.bench.ingest import busy_share, machine_cpu_seconds


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_busy_time_grows_at_least_by_this_process_work() -> None:
    before = machine_cpu_seconds()
    spent = time.process_time()
    while time.process_time() - spent < 0.3:  # work that must show as busy machine time
        pass
    after = machine_cpu_seconds()
    assert before is not None and after is not None
    assert 0 <= before[0] <= before[1] and 0 <= after[0] <= after[1]
    assert after[0] - before[0] >= 0.3 - 0.05  # a tick of rounding per core, at most
    share = busy_share(before, after)
    assert share is not None and 0 < share <= 1


def test_busy_share_needs_two_readings_apart() -> None:
    assert busy_share(None, (1.0, 2.0)) is None
    assert busy_share((1.0, 2.0), None) is None
    assert busy_share((1.0, 2.0), (1.0, 2.0)) is None
    assert busy_share((1.0, 2.0), (2.0, 6.0)) == pytest.approx(0.25)
