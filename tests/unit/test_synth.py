"""The synthetic stream: contract events from a known latent-factor model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from freshrec.evaluation.datasets import read_events
from freshrec.evaluation.synth import (
    SynthConfig,
    SynthStream,
    clipped_normal_mean,
    generate,
    write_jsonl,
)

SMALL = SynthConfig(users=300, items=200, events=20_000, seed=11)


@pytest.fixture(scope="module")
def stream() -> SynthStream:
    return generate(SMALL)


def test_events_follow_the_contract_schema(stream: SynthStream) -> None:
    for event in stream.events[:500]:
        assert isinstance(event["event_id"], str)
        assert event["type"] in {"rating", "view", "click", "purchase"}
        assert event["user_id"].startswith("u") and event["item_id"].startswith("i")
        assert isinstance(event["ts"], float)
        assert ("value" in event) == (event["type"] == "rating")
        json.dumps(event, allow_nan=False)


def test_event_ids_are_unique(stream: SynthStream) -> None:
    assert len({e["event_id"] for e in stream.events}) == len(stream.events) == SMALL.events


def test_events_are_time_ordered(stream: SynthStream) -> None:
    ts = np.array([e["ts"] for e in stream.events])
    assert np.all(np.diff(ts) >= 0)
    assert SMALL.start_ts <= ts[0] and ts[-1] <= SMALL.start_ts + SMALL.duration_s


def test_ids_index_the_ground_truth_arrays(stream: SynthStream) -> None:
    users = np.array([int(e["user_id"][1:]) for e in stream.events])
    items = np.array([int(e["item_id"][1:]) for e in stream.events])
    assert np.array_equal(users, stream.user_index)
    assert np.array_equal(items, stream.item_index)
    assert stream.user_factors.shape == (SMALL.users, SMALL.factors)
    assert stream.item_factors.shape == (SMALL.items, SMALL.factors)


def test_unreleased_items_never_appear(stream: SynthStream) -> None:
    ts = np.array([e["ts"] for e in stream.events])
    assert np.all(stream.release_ts[stream.item_index] <= ts)


def test_new_items_are_released_during_the_stream(stream: SynthStream) -> None:
    later = stream.release_ts > SMALL.start_ts
    assert later.sum() == round(SMALL.new_item_share * SMALL.items)
    new_items_seen = np.unique(stream.item_index[later[stream.item_index]])
    assert new_items_seen.size > 0.5 * later.sum()  # released items do get picked up


def test_item_popularity_is_heavy_tailed(stream: SynthStream) -> None:
    counts = np.sort(np.bincount(stream.item_index, minlength=SMALL.items))[::-1]
    assert counts[: SMALL.items // 10].sum() > 0.4 * counts.sum()


def test_user_activity_is_skewed(stream: SynthStream) -> None:
    counts = np.sort(np.bincount(stream.user_index, minlength=SMALL.users))[::-1]
    assert counts[: SMALL.users // 10].sum() > 0.2 * counts.sum()


def test_users_pick_items_they_have_affinity_for() -> None:
    config = SynthConfig(users=200, items=300, events=10_000, affinity_temperature=0.3, seed=5)
    s = generate(config)
    chosen = np.einsum("ek,ek->e", s.user_factors[s.user_index], s.item_factors[s.item_index])
    # Same users, items drawn by popularity alone: what choice would look like without taste.
    rng = np.random.default_rng(0)
    blind = rng.choice(config.items, size=s.item_index.size, p=s.item_popularity)
    baseline = np.einsum("ek,ek->e", s.user_factors[s.user_index], s.item_factors[blind])
    assert chosen.mean() > baseline.mean() + 0.1


def test_type_shares_follow_the_config(stream: SynthStream) -> None:
    types = [e["type"] for e in stream.events]
    share = {t: types.count(t) / len(types) for t in ("rating", "view", "click", "purchase")}
    implicit = 1 - SMALL.rating_share
    expected = {"rating": SMALL.rating_share, "view": 0.5 * implicit}
    expected |= {"click": 0.4 * implicit, "purchase": 0.1 * implicit}
    for kind, value in expected.items():
        assert share[kind] == pytest.approx(value, abs=0.02)


def test_ratings_lie_on_the_scale(stream: SynthStream) -> None:
    values = stream.observed_ratings()
    assert values.min() >= 1.0 and values.max() <= 5.0
    assert np.unique(values).size > 0.9 * values.size  # floats, not rounded stars


def test_expected_ratings_are_the_noise_free_model(stream: SynthStream) -> None:
    users = stream.user_index[stream.rating_positions]
    items = stream.item_index[stream.rating_positions]
    mean = (
        stream.global_mean
        + stream.user_bias[users]
        + stream.item_bias[items]
        + (stream.user_factors[users] * stream.item_factors[items]).sum(axis=1)
    )
    assert np.allclose(stream.expected_ratings, np.clip(mean, 1.0, 5.0))


@pytest.mark.parametrize("noise_std", [0.25, 0.5])
def test_noise_floor_matches_configured_noise(noise_std: float) -> None:
    s = generate(SynthConfig(users=300, items=200, events=30_000, noise_std=noise_std, seed=2))
    # Clipping at the ends of the scale can only shrink the error, and only a little.
    assert 0.9 * noise_std < s.noise_floor_rmse() < 1.03 * noise_std


def test_the_clipped_mean_is_the_mean_of_clipped_draws() -> None:
    rng = np.random.default_rng(9)
    means = np.array([0.2, 1.1, 3.0, 4.8, 5.6])
    draws = np.clip(means[:, None] + rng.normal(0.0, 0.5, (means.size, 400_000)), 1.0, 5.0)
    expected = clipped_normal_mean(means, 0.5, 1.0, 5.0)
    np.testing.assert_allclose(expected, draws.mean(axis=1), atol=0.003)  # ~4 standard errors


def test_the_noise_floor_is_the_oracles_error_below_the_clipped_means() -> None:
    """The floor is the error of predicting each rating's expectation: in mean squared error the
    best there is, so below that of the clipped noise-free value, which ignores that the noise
    can only push a rating near an end of the scale inwards."""
    s = generate(SynthConfig(users=300, items=200, events=30_000, noise_std=0.5, seed=2))
    clipped = float(np.sqrt(np.mean((s.observed_ratings() - s.expected_ratings) ** 2)))
    assert s.noise_floor_rmse() < clipped
    assert s.oracle_ratings.shape == s.expected_ratings.shape


def test_noise_floor_needs_ratings() -> None:
    s = generate(SynthConfig(users=10, items=10, events=50, rating_share=0.0))
    with pytest.raises(ValueError, match="no rating events"):
        s.noise_floor_rmse()


def test_same_seed_same_stream() -> None:
    config = SynthConfig(users=50, items=40, events=1000, seed=3)
    first, second = generate(config), generate(config)
    assert first.events == second.events
    assert np.array_equal(first.user_factors, second.user_factors)
    assert generate(SynthConfig(users=50, items=40, events=1000, seed=4)).events != first.events


def test_event_count_does_not_change_the_model() -> None:
    short = generate(SynthConfig(users=50, items=40, events=100))
    long = generate(SynthConfig(users=50, items=40, events=5000))
    assert np.array_equal(short.item_factors, long.item_factors)
    assert np.array_equal(short.release_ts, long.release_ts)


def test_every_item_new_still_leaves_one_to_choose_from() -> None:
    s = generate(SynthConfig(users=20, items=10, events=500, new_item_share=1.0))
    assert (s.release_ts == s.config.start_ts).sum() == 1
    ts = np.array([e["ts"] for e in s.events])
    assert np.all(s.release_ts[s.item_index] <= ts)


def test_invalid_config_names_every_problem() -> None:
    with pytest.raises(ValueError, match=r"users must be at least 1.*rating_share must lie"):
        SynthConfig(users=0, rating_share=1.5)


def test_written_jsonl_reads_back_as_the_same_events(tmp_path: Path) -> None:
    events = generate(SynthConfig(users=20, items=20, events=300)).events
    for name in ("events.jsonl", "events.jsonl.gz"):
        assert write_jsonl(events, tmp_path / name) == len(events)
        assert list(read_events(tmp_path / name)) == events
