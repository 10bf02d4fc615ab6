"""A concept change injected into the synthetic stream happens where and to whom it is said."""

from __future__ import annotations

import numpy as np
import pytest

from freshrec.evaluation.synth import SynthConfig, generate

BASE = SynthConfig(users=80, items=60, events=4000, change_at=2500, seed=4)


def test_rotated_users_keep_their_factor_norms_and_only_they_change() -> None:
    stream = generate(SynthConfig(**{**BASE.__dict__, "rotate_user_share": 0.25}))
    changed = stream.changed_user_factors
    assert changed is not None and stream.rotated_users.size == 20
    moved = np.flatnonzero(np.any(changed != stream.user_factors, axis=1))
    assert moved.tolist() == stream.rotated_users.tolist()
    norms = np.linalg.norm(stream.user_factors, axis=1)
    assert np.linalg.norm(changed, axis=1) == pytest.approx(norms)


def test_ratings_follow_the_old_factors_before_the_change_and_the_new_ones_after() -> None:
    stream = generate(SynthConfig(**{**BASE.__dict__, "rotate_user_share": 0.5}))
    positions = stream.rating_positions
    users, items = stream.user_index[positions], stream.item_index[positions]
    after = positions >= BASE.change_at
    old = stream.expected_rating(users, items)
    new = stream.expected_rating(users, items, changed=True)
    assert stream.expected_ratings[~after] == pytest.approx(old[~after])
    assert stream.expected_ratings[after] == pytest.approx(new[after])
    assert not np.allclose(old[after], new[after])


def test_the_cluster_appears_at_the_change_and_items_stay_in_release_order() -> None:
    stream = generate(SynthConfig(**{**BASE.__dict__, "cluster_items": 10, "cluster_share": 0.5}))
    cluster = set(stream.cluster_items.tolist())
    assert len(cluster) == 10 and stream.item_factors.shape[0] == 70
    in_cluster = np.isin(stream.item_index, list(cluster))
    assert not in_cluster[: BASE.change_at].any()
    assert in_cluster[BASE.change_at :].mean() > 0.1
    assert np.all(np.diff(stream.release_ts) >= 0)


def test_the_unchanged_prefix_equals_the_stream_without_a_change() -> None:
    plain = generate(SynthConfig(**{**BASE.__dict__, "change_at": None}))
    rotated = generate(SynthConfig(**{**BASE.__dict__, "rotate_user_share": 0.5}))
    assert rotated.events[: BASE.change_at] == plain.events[: BASE.change_at]
    clustered = generate(SynthConfig(**{**BASE.__dict__, "cluster_items": 10}))
    assert clustered.events[: BASE.change_at] == plain.events[: BASE.change_at]


def test_a_change_without_its_event_is_refused() -> None:
    with pytest.raises(ValueError, match="change_at"):
        SynthConfig(rotate_user_share=0.2)
