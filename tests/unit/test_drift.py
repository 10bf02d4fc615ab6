"""The drift monitor against river's detectors fed directly, the divergences against recounts."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import pytest
from river import drift

from freshrec.models.drift import (
    PER_EVENT,
    DriftMonitor,
    Watch,
    WindowDivergence,
    jensen_shannon,
    total_variation,
)


def _shifting_stream(seed: int, n: int = 6000, shifts: int = 3) -> list[float]:
    """Gaussian values whose mean and spread jump at evenly spaced points."""
    rng = random.Random(seed)
    out = []
    for _ in range(shifts + 1):
        mu, sigma = rng.uniform(-2, 2), rng.uniform(0.5, 2)
        out += [rng.gauss(mu, sigma) for _ in range(n // (shifts + 1))]
    return out


def _river_firings(
    values: list[float], warmup: int, detector: drift.ADWIN | drift.PageHinkley, mode: str
) -> list[int]:
    """Positions (1-based, as the monitor counts) where river's detector fires on the
    values standardised by the mean and sample deviation of the first ``warmup``; for
    ADWIN, only the cuts after which its estimate moved in the direction ``mode``."""
    head = values[:warmup]
    mu = sum(head) / warmup
    sigma = math.sqrt(sum((x - mu) ** 2 for x in head) / (warmup - 1))
    out = []
    for position, x in enumerate(values[warmup:], start=warmup + 1):
        before = detector.estimation if isinstance(detector, drift.ADWIN) else 0.0
        detector.update((x - mu) / sigma)
        if not detector.drift_detected:
            continue
        if isinstance(detector, drift.ADWIN) and mode != "both":
            after = detector.estimation
            if (after > before) != (mode == "up"):
                continue
        out.append(position)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("mode", ["up", "down", "both"])
def test_the_monitor_fires_exactly_when_river_does_on_the_same_stream(seed: int, mode: str) -> None:
    values = _shifting_stream(seed)
    watch = Watch(mode=mode, warmup=300, ph_threshold=20.0, ph_delta=0.1, ph_alpha=0.999)
    monitor = DriftMonitor({"s": watch}, history=1000)
    for t, x in enumerate(values):
        monitor.update("s", x, ts=float(t))
    adwin = _river_firings(values, 300, drift.ADWIN(delta=0.002, clock=32), mode)
    ph = _river_firings(
        values,
        300,
        drift.PageHinkley(min_instances=30, delta=0.1, threshold=20.0, alpha=0.999, mode=mode),
        mode,
    )
    got = {
        name: [f.position for f in monitor.firings if f.detector == name]
        for name in ("adwin", "page_hinkley")
    }
    assert got == {"adwin": adwin, "page_hinkley": ph}
    assert adwin and ph  # the stream does shift, so the comparison is not vacuous
    assert monitor.detections["s", "adwin"] == len(adwin)


def test_blocks_and_a_moving_reference_feed_river_what_a_recount_gives() -> None:
    values = _shifting_stream(4, n=8000)
    block, warmup, halflife = 10, 30, 50.0
    watch = Watch(
        mode="up",
        block=block,
        warmup=warmup,
        reference_halflife=halflife,
        adwin_clock=1,
        ph_delta=0.5,
        ph_threshold=8.0,
        ph_min_instances=5,
        ph_alpha=1.0,
    )
    monitor = DriftMonitor({"s": watch}, history=1000)
    for t, x in enumerate(values):
        monitor.update("s", x, ts=float(t))
    means = [sum(values[i : i + block]) / block for i in range(0, len(values), block)]
    ph = drift.PageHinkley(min_instances=5, delta=0.5, threshold=8.0, alpha=1.0, mode="up")
    head = means[:warmup]
    mu = sum(head) / warmup
    var = sum((x - mu) ** 2 for x in head) / (warmup - 1)
    alpha = 1 - 0.5 ** (1 / halflife)
    expected = []
    for index, x in enumerate(means[warmup:], start=warmup + 1):
        ph.update((x - mu) / math.sqrt(var))
        mu, var = mu + alpha * (x - mu), (1 - alpha) * (var + alpha * (x - mu) ** 2)
        if ph.drift_detected:
            expected.append(index * block)  # a block fires on its last value
    got = [f.position for f in monitor.firings if f.detector == "page_hinkley"]
    assert got == expected and expected


def _learning_errors(seed: int, step_at: int | None) -> list[float]:
    """Absolute errors of a model that keeps learning: their level falls from 1.0 to 0.5
    over 20,000 values; with ``step_at``, it rises by 0.15 there for 2,000 values."""
    rng = random.Random(seed)
    out = []
    for t in range(24_000):
        level = 1.0 - 0.5 * min(t, 20_000) / 20_000
        if step_at is not None and step_at <= t < step_at + 2000:
            level += 0.15
        out.append(abs(rng.gauss(0.0, level)))
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_moving_reference_sees_a_rise_that_a_learning_trend_hides(seed: int) -> None:
    moving = PER_EVENT  # the rating error's watch
    fixed = dataclasses.replace(moving, reference_halflife=None)
    for watch, seen in ((moving, True), (fixed, False)):
        level = DriftMonitor({"s": watch})
        stepped = DriftMonitor({"s": watch})
        for t, (a, b) in enumerate(
            zip(_learning_errors(seed, None), _learning_errors(seed, 20_000), strict=True)
        ):
            level.update("s", a, ts=float(t))
            stepped.update("s", b, ts=float(t))
        assert not [f for f in level.firings if f.detector == "page_hinkley"]
        fired = [f.ts for f in stepped.firings if f.detector == "page_hinkley"]
        assert bool(fired) == seen, (watch, fired)
        if seen:
            assert 20_000 <= fired[0] < 21_000


def test_a_block_or_a_reference_that_cannot_work_is_refused() -> None:
    with pytest.raises(ValueError, match="block"):
        Watch(block=0)
    with pytest.raises(ValueError, match="reference_halflife"):
        Watch(reference_halflife=0.0)


def test_a_firing_carries_the_event_time_and_the_means_before_and_after() -> None:
    monitor = DriftMonitor(default=Watch(warmup=100, recent=50))
    rng = random.Random(4)
    values = [rng.gauss(0, 1) for _ in range(2000)] + [rng.gauss(5, 1) for _ in range(500)]
    for t, x in enumerate(values):
        monitor.update("s", x, ts=1000.0 + t)
    first = monitor.firings[0]
    assert first.signal == "s" and first.ts == 1000.0 + first.position - 1
    assert 2000 < first.position < 2100
    recent = values[first.position - 50 : first.position]
    assert first.after == pytest.approx(sum(recent) / 50)
    assert first.before == pytest.approx(
        sum(values[100 : first.position - 1]) / (first.position - 101)
    )
    assert first.as_dict()["detector"] == first.detector


def test_adwin_cuts_in_the_direction_that_is_not_watched_are_not_firings() -> None:
    rng = random.Random(7)
    values = [rng.gauss(1, 1) for _ in range(3000)] + [rng.gauss(0, 1) for _ in range(3000)]
    up = DriftMonitor({"s": Watch(mode="up", warmup=100)})
    both = DriftMonitor({"s": Watch(mode="both", warmup=100)})
    for t, x in enumerate(values):
        up.update("s", x, ts=float(t))
        both.update("s", x, ts=float(t))
    assert both.detections["s", "adwin"] >= 1
    assert up.detections["s", "adwin"] == 0 and up.detections["s", "page_hinkley"] == 0


def test_signals_are_independent_and_silent_during_their_warmup() -> None:
    monitor = DriftMonitor(default=Watch(warmup=500))
    for t in range(499):
        assert monitor.update("a", 0.0 if t < 250 else 100.0, ts=float(t)) == []
    assert monitor.update("b", 1.0, ts=0.0) == []
    assert set(monitor.means()) == {"a", "b"}


def test_the_history_keeps_only_the_latest_firings() -> None:
    monitor = DriftMonitor(default=Watch(warmup=50, ph_threshold=5.0), history=3)
    rng = random.Random(5)
    for t in range(20_000):
        monitor.update("s", rng.gauss(0 if (t // 1000) % 2 else 4, 1), ts=float(t))
    assert len(monitor.firings) == 3
    assert sum(monitor.detections.values()) > 3
    assert [f.position for f in monitor.firings] == sorted(f.position for f in monitor.firings)


def test_an_unknown_mode_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'up', 'down', 'both'"):
        Watch(mode="sideways")


def _brute_js(p: Counter[str], q: Counter[str]) -> float:
    keys = sorted(set(p) | set(q))
    pn = [p[k] / sum(p.values()) for k in keys]
    qn = [q[k] / sum(q.values()) for k in keys]
    m = [(a + b) / 2 for a, b in zip(pn, qn, strict=True)]

    def kl(x: list[float]) -> float:
        return sum(a * math.log(a / c, 2) for a, c in zip(x, m, strict=True) if a > 0)

    return (kl(pn) + kl(qn)) / 2


def test_window_divergence_equals_a_brute_force_recount_of_each_window() -> None:
    rng = random.Random(6)
    keys = [f"i{int(rng.paretovariate(1.2))}" for _ in range(5000)]
    keys += [f"j{rng.randrange(20)}" for _ in range(1000)]  # a new cluster takes over
    window, refs = 300, 4
    got = WindowDivergence(window=window, reference_windows=refs).update(keys)
    tv = WindowDivergence(window=window, reference_windows=refs, measure="tv").update(keys)
    windows = [Counter(keys[k : k + window]) for k in range(0, len(keys) - window + 1, window)]
    expected_js, expected_tv = [], []
    for k in range(1, len(windows)):
        reference = sum(windows[max(0, k - refs) : k], Counter())
        expected_js.append(_brute_js(windows[k], reference))
        p, q = windows[k], reference
        union = set(p) | set(q)
        expected_tv.append(sum(abs(p[x] / window - q[x] / sum(q.values())) for x in union) / 2)
    assert got == pytest.approx(expected_js, abs=1e-12)
    assert tv == pytest.approx(expected_tv, abs=1e-12)
    assert max(got[-3:]) > 2 * max(got[:10])


def test_divergence_is_symmetric_and_zero_only_for_equal_distributions() -> None:
    p, q = Counter(a=3, b=1), Counter(b=2, c=2)
    assert jensen_shannon(p, q) == pytest.approx(jensen_shannon(q, p))
    assert jensen_shannon(p, Counter(a=6, b=2)) == 0.0
    assert total_variation(p, q) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        jensen_shannon(p, Counter())
