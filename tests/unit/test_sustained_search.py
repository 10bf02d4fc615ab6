"""The sustained-rate search's parameters, without servers: a search that could take no lag
sample, or no hold at all, is refused before a pipeline is started for it."""

from __future__ import annotations

import pytest

from freshrec.bench.soak import SustainedSearch


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"settle_s": -1.0},
        {"sample_s": 0.0},
        {"hold_s": 0.2, "sample_s": 0.5},
    ],
)
def test_a_search_that_could_measure_nothing_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="a search takes"):
        SustainedSearch(**bad)  # type: ignore[arg-type]


def test_the_defaults_and_the_tests_short_search_are_accepted() -> None:
    assert SustainedSearch().steps == 4
    assert SustainedSearch(steps=2, settle_s=1.0, hold_s=3.0, sample_s=0.25).hold_s == 3.0
