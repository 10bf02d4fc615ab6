"""A/B variants: parsing, stable bucketing, and each variant's own configuration."""

from __future__ import annotations

import pytest

from freshrec.serving.funnel_config import FunnelConfig
from freshrec.serving.variants import Variants

SPEC = '{"control": {"share": 0.7}, "diverse": {"share": 0.3, "diversity": 0.6}}'


def test_assignment_is_stable_per_user_and_follows_the_shares() -> None:
    first, again = Variants.parse(SPEC, FunnelConfig()), Variants.parse(SPEC, FunnelConfig())
    users = [f"user-{n}" for n in range(5000)]
    names = [first.assign(u).name for u in users]
    assert names == [again.assign(u).name for u in users]
    assert 0.27 < names.count("diverse") / len(names) < 0.33


def test_each_variant_serves_its_own_overrides_on_the_base_configuration() -> None:
    base = FunnelConfig(diversity=0.15)
    variants = Variants.parse(SPEC, base)
    for user in (f"user-{n}" for n in range(200)):
        variant = variants.assign(user)
        expected = 0.6 if variant.name == "diverse" else base.diversity
        assert variant.config.diversity == expected
        assert variant.config.exploration_slots == base.exploration_slots


def test_a_variant_may_name_its_channels_and_blend() -> None:
    spec = '{"cf_alone": {"share": 1.0, "channels": ["cf"], "blend": {"cf": 1.0}}}'
    variant = Variants.parse(spec, FunnelConfig()).assign("anyone")
    assert variant.config.blend == (("cf", 1.0),) and variant.config.channels == ("cf",)


def test_a_blend_over_an_unknown_feature_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown features"):
        Variants.parse('{"x": {"share": 1.0, "blend": {"novelty": 1.0}}}', FunnelConfig())


def test_a_variant_may_trade_mf_recall_for_speed_within_zero_to_one() -> None:
    spec = '{"fast": {"share": 1.0, "mf_read_share": 0.1}}'
    assert Variants.parse(spec, FunnelConfig()).assign("anyone").config.mf_read_share == 0.1
    with pytest.raises(ValueError, match="mf_read_share must be in"):
        Variants.parse('{"x": {"share": 1.0, "mf_read_share": 0}}', FunnelConfig())


def test_the_rating_scale_is_the_datas_not_a_variants() -> None:
    """Ratings are predicted with the base configuration's scale: a variant may not move it."""
    with pytest.raises(ValueError, match="rating_scale is not a variant setting"):
        Variants.parse('{"x": {"share": 1.0, "rating_scale": [0, 10]}}', FunnelConfig())


def test_the_decay_half_life_is_the_states_not_a_variants() -> None:
    """The reader reads the workers' decayed sums at the rate stored with them: no variant
    setting moves it."""
    with pytest.raises(ValueError, match=r"unknown settings \['decay_half_life_s'\]"):
        Variants.parse('{"x": {"share": 1.0, "decay_half_life_s": 60}}', FunnelConfig())
