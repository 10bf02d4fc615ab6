"""The funnel on real Redis state built by the real batch updater."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from freshrec.models.biased_mf import BiasedMF
from freshrec.models.choice_ranker import ChoiceRanker
from freshrec.models.click_model import FEATURES, ClickModel, state_from_hash
from freshrec.models.config import ModelConfig
from freshrec.models.decay import ForwardDecay
from freshrec.models.mf import VectorTable
from freshrec.models.rating_stack import Blend, RatingStack
from freshrec.serving.funnel import Funnel
from freshrec.serving.funnel_config import FunnelConfig
from freshrec.serving.variants import Variants
from freshrec.settings import Settings
from freshrec.store.batch_update import BatchUpdater
from freshrec.store.keys import Keys
from freshrec.store.server_scripts import NEIGHBOUR_LISTS
from freshrec.streams.events import Event

pytestmark = pytest.mark.integration
TS = 1_700_000_000.0


def _catalogue(n_users: int = 40, n_items: int = 60) -> list[Event]:
    """Users clicking around a catalogue, with a few items far more popular than the rest."""
    rng = np.random.default_rng(4)
    events, t = [], TS
    for _ in range(3000):
        user = f"u{rng.integers(n_users)}"
        item = (
            f"i{min(int(rng.zipf(1.5)) - 1, n_items - 1)}"
            if rng.random() < 0.5
            else f"i{rng.integers(n_items)}"
        )
        events.append(Event("click", user, item, t))
        t += 1.0
    return events


async def _setup(
    settings: Settings, events: list[Event], established_impressions: int = 0
) -> tuple[Redis, Keys, BatchUpdater]:
    """Learn ``events``; optionally give every item so far that many impressions (not cold)."""
    redis = Redis.from_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    updater = BatchUpdater(redis, keys, settings.model_config())
    for start in range(0, len(events), 500):
        await updater.apply(events[start : start + 500])
    if established_impressions:
        items = sorted({e.item_id for e in events})
        shown = [Event("impression", "crowd", i, TS) for i in items] * established_impressions
        await updater.apply(shown)
    return redis, keys, updater


def test_seen_and_unavailable_items_are_never_returned(settings: Settings) -> None:
    async def run() -> None:
        events = _catalogue()
        redis, keys, _ = await _setup(settings, events)
        funnel = Funnel(redis, keys, settings.funnel_config())
        seen = {e.item_id for e in events if e.user_id == "u3"}
        await redis.sadd(keys.unavailable, "i0", "i1")
        for k in (10, 50, 200):
            items = [c.item_id for c in await funnel.recommend("u3", k)]
            assert items and not (set(items) & seen) and not {"i0", "i1"} & set(items)
            assert len(items) == len(set(items))
        await funnel.aclose()
        await redis.aclose()

    asyncio.run(run())


def test_business_rules_drop_and_boost(settings: Settings) -> None:
    async def run() -> None:
        redis, keys, _ = await _setup(settings, _catalogue())

        plain = Funnel(redis, keys, settings.funnel_config())
        before = [c.item_id for c in await plain.recommend("stranger", 50)]
        assert any(i.endswith("7") for i in before[:20]), "nothing for the rule to drop"
        boosted = next(i for i in before[10:] if not i.endswith("7"))

        async def rule(user: str, items: list[str]) -> np.ndarray:
            return np.array(
                [0.0 if i.endswith("7") else (5.0 if i == boosted else 1.0) for i in items]
            )

        funnel = Funnel(redis, keys, settings.funnel_config(), rules=[rule])
        items = [c.item_id for c in await funnel.recommend("stranger", 20)]
        assert not [i for i in items if i.endswith("7")]
        assert boosted in items and items.index(boosted) < before.index(boosted)
        await funnel.aclose()
        await plain.aclose()
        await redis.aclose()

    asyncio.run(run())


async def _two_new_items(settings: Settings) -> tuple[Redis, BatchUpdater, Funnel]:
    """An established catalogue (every item well shown), then two new, never-shown items."""
    redis, keys, updater = await _setup(settings, _catalogue(), established_impressions=100)
    await updater.apply(
        [Event("view", "u90", "fresh-a", TS + 5000), Event("view", "u91", "fresh-b", TS + 5001)]
    )
    config = dataclasses.replace(
        settings.funnel_config(), exploration_slots=1, cold_max_impressions=60
    )
    return redis, updater, Funnel(redis, keys, config)


def test_a_cold_item_is_explored_then_loses_exposure_without_clicks(settings: Settings) -> None:
    async def run() -> None:
        redis, updater, funnel = await _two_new_items(settings)

        async def explored(user: str) -> list[str]:
            served = await funnel.recommend(user, 10)
            return [c.item_id for c in served if c.channels[0] == "explore"]

        first = await explored("u5")
        assert first and first[0] in {"fresh-a", "fresh-b"}
        # Show "fresh-a" many times without a click, as the impression log would.
        await updater.apply([Event("impression", "u5", "fresh-a", TS + 6000)] * 40)
        await updater.apply([Event("impression", "u6", "fresh-b", TS + 6000)] * 5)
        await funnel.refresh()  # as the reader does every interval
        assert await explored("u7") == ["fresh-b"]
        # Past the cold limit it leaves the cold pool altogether.
        await updater.apply([Event("impression", "u5", "fresh-a", TS + 6001)] * 30)
        await funnel.refresh()
        assert "fresh-a" not in await explored("u8")
        await funnel.aclose()
        await redis.aclose()

    asyncio.run(run())


def test_a_cold_item_that_gets_clicks_keeps_its_exposure(settings: Settings) -> None:
    async def run() -> None:
        redis, updater, funnel = await _two_new_items(settings)
        # Both shown equally often; only "fresh-a" is clicked, by users who saw it.
        await updater.apply([Event("impression", f"v{n}", "fresh-a", TS + 6000) for n in range(30)])
        await updater.apply([Event("impression", f"v{n}", "fresh-b", TS + 6000) for n in range(30)])
        await updater.apply([Event("click", f"v{n}", "fresh-a", TS + 6001) for n in range(12)])
        await funnel.refresh()
        for user in ("u2", "u9", "u11"):
            served = await funnel.recommend(user, 10)
            explored = [c.item_id for c in served if c.channels[0] == "explore"]
            assert explored == ["fresh-a"], (user, explored)
        await funnel.aclose()
        await redis.aclose()

    asyncio.run(run())


def test_a_variant_can_rank_by_its_own_blend(settings: Settings) -> None:
    spec = '{"cf_alone": {"share": 1.0, "channels": ["cf"], "blend": {"cf": 1.0}}}'
    variant = Variants.parse(spec, settings.funnel_config()).assign("anyone")

    async def run() -> None:
        redis, keys, _ = await _setup(settings, _catalogue())
        config = dataclasses.replace(variant.config, diversity=0.0, exploration_slots=0)
        funnel = Funnel(redis, keys, config)
        served = await funnel.serve("u3", 5)
        await funnel.aclose()
        cf = served.features[:, 1]  # FEATURES[1] is the CF score
        assert len(served.items) == 5 and all(c.channels == ["cf"] for c in served.items)
        assert cf.tolist() == sorted(cf.tolist(), reverse=True) and cf[-1] > 0
        await redis.aclose()

    asyncio.run(run())


def test_only_a_configuration_that_opts_in_serves_the_learned_ranker(settings: Settings) -> None:
    async def run() -> None:
        redis, keys, _ = await _setup(settings, _catalogue())
        model = ClickModel()
        for _ in range(60):
            model.learn_click({"mf": 1.0, "cf": 0.5})
        await redis.hset(keys.click_model_state, mapping=model.state())
        funnel = Funnel(redis, keys, settings.funnel_config())
        await funnel.refresh()
        opted_in = dataclasses.replace(funnel.config, min_clicks=50)
        assert not funnel.scorer().learned and funnel.scorer(opted_in).learned
        shown = await funnel.serve("u3", 10, opted_in)
        assert len(shown.items) == 10 and all(0 < c.score < 1 for c in shown.items)  # P(click)
        await funnel.aclose()
        await redis.aclose()

    asyncio.run(run())


def _stack_learning(ratings: list[Event], config: ModelConfig) -> RatingStack:
    """The rating stack in memory, from nothing, having learned ``ratings`` one at a time."""
    table = VectorTable(config.factors, config.init_std, config.seed)
    mf = BiasedMF(table, config.lr, config.reg, 0.0, 0, config.bias_lr, config.bias_shrinkage)
    stack = RatingStack(
        mf, {}, {}, {}, Blend.prior_state(), config.rating_history, config.rating_pairs_window
    )
    for e in ratings:
        stack.learn_one(e.user_id, e.item_id, e.value)  # type: ignore[arg-type]
    return stack


def test_a_prediction_is_the_rating_stacks_on_the_stored_state(settings: Settings) -> None:
    """Ratings learned in batches through Redis (records, pair statistics, counts and blend
    read back and added to) predict what the stack learned one rating at a time in memory
    predicts: for a known pair, a new item, a new user and neither."""

    async def run() -> None:
        ratings = [
            Event("rating", f"u{n % 5}", f"i{n % 7}", TS + n, value=float(1 + n * n % 5))
            for n in range(60)
        ]
        redis = Redis.from_url(settings.redis_url)
        keys = Keys(settings.key_prefix)
        config = settings.model_config()
        updater = BatchUpdater(redis, keys, config)
        for start in range(0, len(ratings), 20):
            await updater.apply(ratings[start : start + 20])
        stack = _stack_learning(ratings, config)
        funnel = Funnel(redis, keys, settings.funnel_config())
        cases = [("u1", "i2"), ("u1", "never-seen"), ("nobody", "i2"), ("nobody", "never-seen")]
        answers = await funnel.predict_many(cases)
        assert [(a["known_user"], a["known_item"]) for a in answers] == [
            (True, True),
            (True, False),
            (False, True),
            (False, False),
        ]
        for (user, item), answer in zip(cases, answers, strict=True):
            expected = min(
                max(stack.predict_one(user, item), settings.rating_min), settings.rating_max
            )
            assert answer["prediction"] == pytest.approx(expected, abs=1e-3), (user, item)
        assert len(await redis.lrange(keys.rating_history("u1"), 0, -1)) == 12
        assert await redis.get(keys.rating_blend) is not None
        await funnel.aclose()
        await redis.aclose()

    asyncio.run(run())


def test_predictions_stay_on_the_rating_scale(settings: Settings) -> None:
    """Before any rating the answer is the scale's midpoint, not a mean of nothing (0, below
    the scale); a blend past the end of the scale is answered at the end."""

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)
        keys = Keys(settings.key_prefix)
        config = settings.funnel_config()
        funnels = {
            scale: Funnel(redis, keys, dataclasses.replace(config, rating_scale=scale))
            for scale in ((1.0, 5.0), (0.5, 10.0), (1.0, 4.0))
        }
        for (low, high), funnel in funnels.items():
            answer = await funnel.predict("a", "b")
            assert answer["prediction"] == (low + high) / 2, (low, high)
        # A user who loves everything: mu + b_u + b_i well above mu.
        ratings = [Event("rating", "fan", f"i{n}", TS + n, value=5.0) for n in range(8)]
        ratings += [Event("rating", "grump", "other", TS + 20.0 + n, value=1.0) for n in range(8)]
        model = settings.model_config()
        await BatchUpdater(redis, keys, model).apply(ratings)
        stack = _stack_learning(ratings, model)
        expected = stack.predict_one("fan", "i3")
        assert 4.0 < expected < 5.0  # inside the default scale, past the end of (1, 4)
        answers = {s: (await f.predict("fan", "i3"))["prediction"] for s, f in funnels.items()}
        assert answers[(1.0, 5.0)] == pytest.approx(expected, abs=1e-3)
        assert answers[(0.5, 10.0)] == pytest.approx(expected, abs=1e-3)
        assert answers[(1.0, 4.0)] == 4.0
        for funnel in funnels.values():
            await funnel.aclose()
        await redis.aclose()

    asyncio.run(run())


def test_a_users_own_newest_event_is_in_their_next_list(settings: Settings) -> None:
    """Read-your-writes: a request whose user acted after the snapshot refreshes it first;
    other users are served from the snapshot as it is."""

    async def run() -> None:
        events = _catalogue()
        redis, keys, updater = await _setup(settings, events)
        funnel = Funnel(redis, keys, settings.funnel_config(), max_staleness_s=3600.0)
        await funnel.refresh()
        refreshed = funnel.index.last_refresh
        await funnel.serve("u2", 10)  # nothing new for u2: the snapshot serves as it is
        assert funnel.index.last_refresh == refreshed

        later = events[-1].ts + 10.0
        await updater.apply([Event("click", "u1", "brand-new", later)])
        assert "brand-new" not in funnel.index.rows
        served = await funnel.serve("u1", 10)
        assert funnel.index.last_refresh > refreshed and funnel.event_clock == later
        assert "brand-new" in funnel.index.rows  # the snapshot holds u1's new item
        assert served.latest_event_ts == later and "brand-new" not in [
            c.item_id for c in served.items
        ]
        await funnel.aclose()
        await redis.aclose()

    asyncio.run(run())


def test_the_reader_takes_the_decay_rate_from_the_state_it_reads(settings: Settings) -> None:
    """The item-CF floor is one interaction at the state's clock at the rate the workers' sums
    grow at, stored with their landmark: a reader has no half-life of its own to get wrong."""
    settings = dataclasses.replace(settings, decay_half_life_s=600.0)
    events = _catalogue()

    async def run() -> None:
        redis, keys, _ = await _setup(settings, events)
        funnel = Funnel(redis, keys, FunnelConfig(), max_staleness_s=3600.0)
        await funnel.refresh()
        landmark = float(await redis.get(keys.decay_landmark))
        clock = float(await redis.get(keys.event_clock))
        rate = settings.model_config().decay_rate
        assert float(await redis.get(keys.decay_rate)) == rate
        floor = math.exp(rate * (clock - landmark))
        assert floor > 30.0  # five half-lives: a default half-life's floor would be about 1
        assert funnel.pools.count_floor == pytest.approx(floor, rel=1e-12)
        occurrences = dict(await redis.zrange(keys.occurrences, 0, -1, withscores=True))
        row = await redis.zrevrange(keys.neighbours("i5"), 0, 49, withscores=True)  # as read
        own = occurrences[b"i5"]
        expected = sorted(
            (w / math.sqrt(max(own, floor) * max(occurrences[m], floor)) for m, w in row),
            reverse=True,
        )[:10]
        similar = await funnel.similar("i5", 10)
        assert [s["score"] for s in similar] == pytest.approx(expected, abs=1e-6)
        await funnel.aclose()
        await redis.aclose()

    asyncio.run(run())


def test_a_refresh_merges_the_rankers_terms_and_gives_back_those_redis_refuses(
    settings: Settings,
) -> None:
    """The choice ranker's learned terms reach the shared sums in one script. A term Redis
    refuses (its field holds no number) goes back to the ranker and fails the refresh, the
    others are applied once; the next refresh sends it again, and the served weights are those
    of a ranker that learned the same choices and merged without a failure."""
    rng = np.random.default_rng(3)
    choices = [(rng.normal(size=(10, len(FEATURES))), int(rng.integers(10))) for _ in range(6)]
    twin = ChoiceRanker()
    for x, chosen in choices:
        twin.learn(x, chosen)
    terms = twin.take_pending()
    twin.load_merged(terms)

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)
        keys = Keys(settings.key_prefix)
        funnel = Funnel(redis, keys, settings.funnel_config(), deterministic=True)
        await funnel.refresh()
        for x, chosen in choices:
            funnel.choice_ranker.learn(x, chosen)
        await redis.hset(keys.choice_ranker_state, "w:mf", "not a number")
        with pytest.raises(ResponseError, match=r"1 choice ranker terms not merged: .*float"):
            await funnel.refresh()
        shared = state_from_hash(
            {k: v for k, v in (await redis.hgetall(keys.choice_ranker_state)).items()
             if k != b"w:mf"}
        )  # fmt: skip
        expected = {name: value for name, value in terms.items() if name != "w:mf"}
        assert shared == pytest.approx(expected, rel=1e-12, abs=1e-15)  # Redis's 17 decimals
        await redis.hdel(keys.choice_ranker_state, "w:mf")
        await funnel.refresh()
        merged = state_from_hash(await redis.hgetall(keys.choice_ranker_state))
        assert merged == pytest.approx(terms, rel=1e-12, abs=1e-15)
        assert np.allclose(funnel.choice_ranker.w, twin.w, rtol=1e-9, atol=1e-12)
        assert funnel.choice_ranker.choices == len(choices)
        await funnel.aclose()
        await redis.aclose()

    asyncio.run(run())


def test_a_reader_reads_every_neighbour_list_ahead_and_a_replay_none(settings: Settings) -> None:
    """Once a reader's snapshot is loaded its neighbour lists are read in the background, as
    Redis holds them, so that a request reads none that has not changed since; a replay's
    funnel (deterministic) reads a list only for a request that needs it."""
    events = _catalogue()

    async def run() -> None:
        redis, keys, _ = await _setup(settings, events)
        replay = Funnel(redis, keys, settings.funnel_config(), deterministic=True)
        await replay.refresh()
        assert (replay.index.loaded[: len(replay.index)] < 0).all()
        funnel = Funnel(redis, keys, settings.funnel_config())
        await funnel.refresh()
        index = funnel.index
        deadline = time.monotonic() + 30
        while (index.loaded[: len(index)] < 0).any():
            assert time.monotonic() < deadline, "the lists were not read ahead"
            await asyncio.sleep(0.01)
        for item in ("i0", "i5", "i37"):
            row = index.rows[item]
            stored = await redis.zrevrange(
                keys.neighbours(item), 0, index.width - 1, withscores=True
            )
            held = [(index.ids[r], w) for r, w in zip(
                index.neighbours[row].tolist(), index.neighbour_weights[row].tolist(), strict=True
            ) if r >= 0]  # fmt: skip
            assert held == [(m.decode(), w) for m, w in stored] and held
        scripts: list[str] = []
        read = funnel.user_state.run_script

        async def counted(source: str, keys: list[str], args: list[Any]) -> Any:
            scripts.append(source)
            return await read(source, keys, args)

        funnel.user_state.run_script = counted  # type: ignore[method-assign]
        served = await funnel.serve("u3", 10)
        assert len(served.items) == 10 and NEIGHBOUR_LISTS not in scripts and scripts
        await funnel.aclose()
        await replay.aclose()
        await redis.aclose()

    asyncio.run(run())


def test_a_rebase_changes_no_cf_score_no_list_and_no_similar_item(settings: Settings) -> None:
    """A rebase multiplies every stored sum by one factor; item-CF's cosines, with their floor
    of one interaction at the state's clock, are ratios of those sums and must not move. Here
    the sums grow 2**25-fold over the stream, so a floor fixed in stored units would not hold."""
    settings = dataclasses.replace(settings, decay_half_life_s=120.0)
    events = _catalogue()  # 3,000 s: 25 half-lives

    async def lists(funnel: Funnel) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        await funnel.refresh()
        served = []
        for user in ("u1", "u2", "u3"):
            served += [c.to_json() for c in (await funnel.serve(user, 10)).items]
        return served, await funnel.similar("i5", 10)

    async def run() -> None:
        redis, keys, updater = await _setup(settings, events)
        funnel = Funnel(redis, keys, settings.funnel_config(), max_staleness_s=3600.0)
        before = await lists(funnel)
        landmark = float(await redis.get(keys.decay_landmark))
        decay = ForwardDecay(settings.model_config().decay_rate, landmark)
        await updater.rebase(decay, events[-1].ts)
        assert float(await redis.get(keys.decay_landmark)) == events[-1].ts
        after = await lists(funnel)
        for was, now in zip(before, after, strict=True):
            assert [c["item_id"] for c in now] == [c["item_id"] for c in was]
            assert [c["score"] for c in now] == pytest.approx([c["score"] for c in was], 1e-5)
        assert funnel.pools.count_floor == 1.0  # the clock is the new landmark
        await funnel.aclose()
        await redis.aclose()

    asyncio.run(run())


def test_item_cf_recency_is_learned_from_choices_and_shared_with_other_readers(
    settings: Settings,
) -> None:
    """Each user's next click is a choice among the candidates their last list held: it moves
    item-CF's recency scale, the move reaches the shared state, and another reader serves
    with it. A configuration without the choice ranker keeps its own scale."""

    async def run() -> None:
        events = _catalogue()
        redis, keys, updater = await _setup(settings, events)
        config = settings.funnel_config()
        funnel = Funnel(redis, keys, config, deterministic=True)
        start = funnel.choice_ranker.theta
        t = TS + len(events)
        for n in range(30):
            user = f"u{n % 20}"
            listed = await funnel.recommend(user, 10, learn=True)
            t += 1.0
            await updater.apply([Event("click", user, listed[n % len(listed)].item_id, t)])
            await funnel.refresh()
            await funnel.recommend(user, 10, learn=True)  # learns the click as a choice
        assert funnel.choice_ranker.choices >= 20
        assert funnel.choice_ranker.theta != start
        await funnel.refresh()  # adds what it learned to the shared state
        merged = state_from_hash(await redis.hgetall(keys.choice_ranker_state))
        assert merged["w:log_cf_recency"] == pytest.approx(funnel.choice_ranker.theta - start)
        other = Funnel(redis, keys, config, deterministic=True)
        await other.refresh()
        assert other.choice_ranker.cf_recency == pytest.approx(funnel.choice_ranker.cf_recency)
        fixed = dataclasses.replace(config, choice_ranker=False)
        user = await other._user("u1", fixed)
        assert user.seed_weights.tolist() == pytest.approx(
            np.exp(-np.arange(len(user.seed_weights)) / config.cf_recency).tolist()
        )
        await funnel.aclose()
        await other.aclose()
        await redis.aclose()

    asyncio.run(run())
