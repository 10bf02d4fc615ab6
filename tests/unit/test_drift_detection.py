"""The detectors see an injected concept change soon after it, and never before it."""

from __future__ import annotations

import pytest

from freshrec.evaluation.drift_detection import WORLD, detection_runs

# Events after the change within which the detector must fire; the figures measured over
# seeds 1-8 by `python -m freshrec.evaluation.drift_detection` are in the README.
CASES = [
    ("new_cluster", "item_divergence", "page_hinkley", 500),
    ("rotate_users", "rating_error", "page_hinkley", 2_000),
]


@pytest.mark.parametrize(("change", "signal", "detector", "within"), CASES)
def test_a_change_is_detected_within_its_delay_and_never_in_the_stable_prefix(
    change: str, signal: str, detector: str, within: int
) -> None:
    runs = detection_runs([1, 3], WORLD, [change])
    assert all(run.false_alarms == 0 for run in runs), [r for r in runs if r.false_alarms]
    watched = [run for run in runs if (run.signal, run.detector) == (signal, detector)]
    assert len(watched) == 2
    assert all(run.delay is not None and run.delay <= within for run in watched), watched
