"""The worker's drift signals per batch equal the monitor fed value by value."""

from __future__ import annotations

import random

from freshrec.models.drift import DriftMonitor, WindowDivergence
from freshrec.store.drift_log import CTR, HIT, SIGNALS, BatchDrift, ctr_signal


def test_batches_feed_the_same_values_as_the_stream_one_by_one() -> None:
    rng = random.Random(8)
    events = [(f"u{rng.randrange(50)}", f"i{int(rng.paretovariate(1.1))}") for _ in range(20_000)]
    events += [(f"u{rng.randrange(50)}", f"new{rng.randrange(10)}") for _ in range(3_000)]
    errors = [abs(rng.gauss(0, 0.5)) for _ in events]
    batched = BatchDrift()
    for start in range(0, len(events), 137):
        chunk = events[start : start + 137]
        users, items = [u for u, _ in chunk], [i for _, i in chunk]
        batched.observe(items, users, errors[start : start + 137], ts=float(start))
    direct = DriftMonitor(SIGNALS)
    items, users = WindowDivergence(500, 5), WindowDivergence(500, 5)
    for (user, item), error in zip(events, errors, strict=True):
        direct.update("rating_error", error, 0.0)
        for value in items.update([item]):
            direct.update("item_divergence", value, 0.0)
        for value in users.update([user]):
            direct.update("user_divergence", value, 0.0)
    assert batched.monitor.detections == direct.detections
    assert batched.monitor.detections["item_divergence", "page_hinkley"] >= 1
    assert batched.monitor.means() == direct.means()


def test_a_variants_click_through_is_fed_once_per_window_of_impressions() -> None:
    drift = BatchDrift(["control", "other"], impressions_window=100)
    drift.observe_clicks({"control": 7})
    assert drift.observe_impressions({"control": 60}, ts=1.0) == []
    drift.observe_clicks({"control": 5})
    drift.observe_impressions({"control": 60, "other": 10}, ts=2.0)
    assert drift.monitor.means() == {ctr_signal("control"): 12 / 120}
    assert drift.monitor.watches[ctr_signal("other")] == CTR and CTR.mode == "down"


def test_a_click_through_that_halves_fires() -> None:
    rng = random.Random(9)
    drift = BatchDrift(["control"], impressions_window=200)
    fired = []
    for window in range(100):
        p = 0.1 if window < 70 else 0.05
        drift.observe_clicks({"control": sum(rng.random() < p for _ in range(200))})
        fired += drift.observe_impressions({"control": 200}, ts=float(window))
    assert fired and all(f.ts >= 70 for f in fired)
    assert any(f.detector == "page_hinkley" and f.ts <= 85 for f in fired)
    assert fired[0].signal == "ctr:control" and fired[0].after < fired[0].before


def test_a_top_n_hit_rate_that_halves_fires_after_the_drop_only() -> None:
    rng = random.Random(10)
    drift = BatchDrift()
    fired = []
    for batch in range(400):
        p = 0.3 if batch < 300 else 0.15
        hits = [rng.random() < p for _ in range(50)]
        fired += drift.observe_clicks({}, hits, ts=float(batch))
    assert drift.monitor.watches["top_n_hit"] == HIT and HIT.mode == "down"
    assert fired and all(f.signal == "top_n_hit" and f.ts >= 300 for f in fired)
    assert fired[0].ts <= 310 and fired[0].after < fired[0].before
