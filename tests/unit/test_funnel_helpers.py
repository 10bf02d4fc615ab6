"""The funnel's pure helpers."""

from __future__ import annotations

import math

import pytest

from freshrec.models.decay import ForwardDecay
from freshrec.serving.funnel import count_floor


def test_the_count_floor_is_one_interaction_at_the_clock_as_the_sums_store_it() -> None:
    rate = math.log(2) / 3600.0
    assert count_floor(rate, b"1000.0", b"8200.0") == pytest.approx(4.0)  # two half-lives
    assert count_floor(rate, b"1000.0", 8200.0) == ForwardDecay(rate, 1000.0).weight(8200.0)
    assert count_floor(repr(rate).encode(), b"1000.0", 8200.0) == count_floor(rate, 1e3, 8200.0)
    assert count_floor(rate, None, 8200.0) == count_floor(rate, b"1000.0", None) == 1.0
    assert count_floor(None, b"1000.0", 8200.0) == 1.0  # no rate stored yet


def test_the_count_floor_stays_finite_and_positive_however_far_the_clock_is() -> None:
    rate = math.log(2) / 60.0
    assert 0.0 < count_floor(rate, b"1e9", b"0") < 1e-300
    assert count_floor(rate, b"0", b"1e9") < math.inf
