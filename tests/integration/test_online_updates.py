"""The online updates in Redis: exact against independent references, safe under concurrency,
applied once under redelivery."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from redis.asyncio import Redis
from river import optim, reco

from freshrec.evaluation.synth import SynthConfig, generate
from freshrec.models.biased_mf import BiasedMF
from freshrec.models.config import ModelConfig
from freshrec.models.cooccurrence import Cooccurrence
from freshrec.models.decay import REBASE_EXPONENT, ForwardDecay
from freshrec.models.mf import (
    VectorTable,
    initial_vector,
    predict_rating,
    rating_count_at,
    rating_part,
    vector_width,
)
from freshrec.models.popularity import Popularity
from freshrec.models.rating_stack import Blend, RatingStack, decode_records
from freshrec.settings import Settings
from freshrec.store.batch_update import (
    INTERACTIONS,
    MAX_EVENTS_PER_WRITE,
    WRITE_TARGET_S,
    BatchUpdater,
    DecayRateMismatch,
)
from freshrec.store.keys import Keys
from freshrec.store.server_scripts import MEMBERS_PER_COMMAND, ServerScripts
from freshrec.store.vectors import decode_vector
from freshrec.streams.events import Event

pytestmark = pytest.mark.integration

TS = 1_700_000_000.0


@pytest.fixture(params=[True, False], ids=["single-redis-scripts", "cluster-safe-pipelines"])
def atomic(request: pytest.FixtureRequest) -> bool:
    """Both write paths: one script per batch, and single-key commands for Redis Cluster."""
    return request.param


def _events(raw: list[dict]) -> list[Event]:
    return [Event(e["type"], e["user_id"], e["item_id"], e["ts"], e.get("value")) for e in raw]


async def _apply_in_batches(updater: BatchUpdater, events: list[Event], size: int) -> list[float]:
    errors: list[float] = []
    for start in range(0, len(events), size):
        result = await updater.apply(events[start : start + size])
        errors.extend(result.rating_errors)
    return errors


def test_mf_in_redis_equals_river_biased_mf_on_10000_ratings(
    settings: Settings, atomic: bool
) -> None:
    cfg = dataclasses.replace(  # a constant bias step, without penalty: river's SGD
        settings.model_config(),
        factors=8,
        lr=0.02,
        reg=0.05,
        bias_lr=0.02,
        bias_shrinkage=math.inf,
        implicit_negatives=0,
    )
    stream = generate(SynthConfig(users=300, items=200, events=10_000, rating_share=1.0, seed=11))
    ratings = _events(stream.events)
    assert len(ratings) == 10_000 and all(e.type == "rating" for e in ratings)

    river_mf = reco.BiasedMF(
        n_factors=cfg.factors,
        bias_optimizer=optim.SGD(cfg.lr / 2),
        latent_optimizer=optim.SGD(cfg.lr / 2),
        l2_bias=0.0,
        l2_latent=2 * cfg.reg,
    )
    for e in ratings:  # the same initial vectors
        for kind, name, table in (
            ("u", e.user_id, river_mf.u_latents),
            ("i", e.item_id, river_mf.i_latents),
        ):
            if name not in table:
                vec = initial_vector(name, kind, cfg.factors, cfg.init_std, cfg.seed)
                table[name] = rating_part(vec, cfg.factors)[1:].copy()
    for e in ratings:
        river_mf.learn_one(e.user_id, e.item_id, e.value)

    async def run() -> tuple[dict[str, np.ndarray], float]:
        redis = Redis.from_url(settings.redis_url)
        keys = Keys(settings.key_prefix)
        await _apply_in_batches(BatchUpdater(redis, keys, cfg, atomic), ratings, 500)
        names = sorted({("u", e.user_id) for e in ratings} | {("i", e.item_id) for e in ratings})
        blobs = await redis.mget(
            [keys.user_vector(n) if k == "u" else keys.item_vector(n) for k, n in names]
        )
        total, n = await redis.hmget(keys.rating_mean, "sum", "n")
        await redis.aclose()
        vectors = {f"{k}:{n}": decode_vector(b) for (k, n), b in zip(names, blobs, strict=True)}
        return vectors, float(total) / int(n)

    vectors, mean = asyncio.run(run())
    assert len(vectors["u:u0"]) == vector_width(cfg.factors)
    # Each row counts its ratings: the batches' deltas add up.
    assert vectors["u:u0"][rating_count_at(cfg.factors)] == sum(e.user_id == "u0" for e in ratings)
    assert vectors["i:i0"][rating_count_at(cfg.factors)] == sum(e.item_id == "i0" for e in ratings)
    # Every final prediction agrees (the served errors are the blend's: the next test).
    users = sorted({e.user_id for e in ratings})[:20]
    items = sorted({e.item_id for e in ratings})[:20]
    for u in users:
        for i in items:
            ours = predict_rating(
                rating_part(vectors[f"u:{u}"], cfg.factors),
                rating_part(vectors[f"i:{i}"], cfg.factors),
                mean,
            )
            assert ours == pytest.approx(river_mf.predict_one(u, i), abs=1e-6)


def test_the_rating_stack_in_redis_equals_the_stack_learned_one_rating_at_a_time(
    settings: Settings, atomic: bool
) -> None:
    """Batches read the records, pair statistics, counts and blend back from Redis and add to
    them; the served (blend) errors and the stored state are those of one pass in memory, up
    to the float32 the state is stored in."""
    cfg = dataclasses.replace(
        settings.model_config(), rating_history=40, rating_pairs_cap=100, rating_pairs_window=15
    )
    stream = generate(SynthConfig(users=60, items=90, events=3_000, rating_share=1.0, seed=5))
    ratings = _events(stream.events)
    table = VectorTable(cfg.factors, cfg.init_std, cfg.seed)
    mf = BiasedMF(table, cfg.lr, cfg.reg, 0.0, 0, cfg.bias_lr, cfg.bias_shrinkage)
    stack = RatingStack(
        mf, {}, {}, {}, Blend.prior_state(), cfg.rating_history, cfg.rating_pairs_window
    )
    expected = [stack.learn_one(e.user_id, e.item_id, e.value) for e in ratings]

    async def run() -> tuple[list[float], dict[str, list[bytes]], dict[str, dict], bytes]:
        redis = Redis.from_url(settings.redis_url)
        keys = Keys(settings.key_prefix)
        errors = await _apply_in_batches(BatchUpdater(redis, keys, cfg, atomic), ratings, 250)
        users = sorted({e.user_id for e in ratings})
        items = sorted({e.item_id for e in ratings})
        records = {u: await redis.lrange(keys.rating_history(u), 0, -1) for u in users}
        pairs = {i: await redis.hgetall(keys.rating_pairs(i)) for i in items}
        blend = await redis.get(keys.rating_blend)
        await redis.aclose()
        return errors, records, pairs, blend

    errors, records, pairs, blend = asyncio.run(run())
    np.testing.assert_allclose(errors, expected, atol=2e-3)
    assert np.sqrt(np.mean(np.square(errors))) < np.std([e.value for e in ratings])
    for user, raw in records.items():
        stored = decode_records(raw)
        assert [r.item for r in stored] == [r.item for r in stack.histories[user]], user
        assert len(stored) <= cfg.rating_history
    for item, row in pairs.items():
        assert {p.decode() for p in row} == set(stack.pairs(item)), item
        for partner, packed in row.items():
            assert np.frombuffer(packed, "<f4") == pytest.approx(
                stack.pairs(item)[partner.decode()], rel=1e-4, abs=1e-3
            )
    state = np.frombuffer(blend, "<f8")
    assert state == pytest.approx(stack.blend.state, rel=1e-3, abs=1e-3)


def test_an_items_rating_pairs_past_twice_the_cap_keep_the_most_co_rated(
    settings: Settings, redis_client
) -> None:
    """The pair hash grows to twice its cap, then keeps the cap partners with the most
    co-raters: memory stays bounded and the strongest evidence stays."""
    from freshrec.store.server_scripts import ServerScripts

    key = Keys(settings.key_prefix).rating_pairs("capped")
    scripts = ServerScripts(redis_client)
    counts = {f"p{n}": float((7 * n) % 13 + 1) for n in range(13)}
    deltas = [np.array([c, 0.5, 1, 2], "<f4").tobytes() for c in counts.values()]
    try:
        scripts.add_rating_pairs(keys=[key], args=[6, b"".join(deltas[:12]), *list(counts)[:12]])
        assert redis_client.hlen(key) == 12  # twice the cap: nothing dropped yet
        more = np.array([20, 0.5, 1, 2], "<f4").tobytes()  # p0 now has the most co-raters
        scripts.add_rating_pairs(keys=[key], args=[6, deltas[12] + more, "p12", "p0"])
        counts["p0"] += 20
        row = redis_client.hgetall(key)
        assert sorted(p.decode() for p in row) == sorted(sorted(counts, key=counts.get)[-6:])
        assert np.frombuffer(row[b"p0"], "<f4").tolist() == [counts["p0"], 1.0, 2.0, 4.0]
    finally:
        redis_client.delete(key)


def test_rating_pairs_trimmed_among_equal_counts_keep_the_first_by_name(
    settings: Settings, redis_client
) -> None:
    """Past the cap, partners with equal co-rater counts are kept by name in byte order, not in
    the order the hash lists its fields (a large hash's order follows the server's random hash
    seed) nor by the server's locale, so every replay of a stream keeps the same partners."""
    from freshrec.store.server_scripts import ServerScripts

    key = Keys(settings.key_prefix).rating_pairs("tied")
    scripts = ServerScripts(redis_client)
    cap = 300  # twice it is past the listpack limits: 128 by default, 512 on local servers
    # Upper and lower case: byte order puts "Q" before "q", a UTF-8 locale's collation after.
    counts = {f"{'Qq'[n % 2]}{n:03d}": 2.0 if n % 5 == 0 else 1.0 for n in range(2 * cap + 1)}
    deltas = b"".join(np.array([c, 0.5, 1, 2], "<f4").tobytes() for c in counts.values())
    members = list(counts)
    try:
        scripts.add_rating_pairs(keys=[key], args=[cap, deltas[: 16 * 2 * cap], *members[:-1]])
        assert redis_client.hlen(key) == 2 * cap  # the hash's own encoding, not a listpack
        assert redis_client.object("encoding", key) == b"hashtable"
        scripts.add_rating_pairs(keys=[key], args=[cap, deltas[16 * 2 * cap :], members[-1]])
        kept = sorted(counts, key=lambda m: (-counts[m], m.encode()))[:cap]
        assert sorted(p.decode() for p in redis_client.hkeys(key)) == sorted(kept)
    finally:
        redis_client.delete(key)


def _learned_alone(events: list[Event], cfg, now: float) -> tuple[dict, dict, dict]:
    """Co-occurrence, occurrence and popularity decayed to ``now``, from the pure learners
    (tests/unit holds them to a brute-force recount) fed one event at a time."""
    cooc = Cooccurrence(
        cfg.cooccurrence_history,
        cfg.decay_rate,
        events[0].ts,
        gap_exponent=cfg.cooccurrence_gap_exponent,
    )
    pop = Popularity(cfg.decay_rate, events[0].ts)
    for e in events:
        if e.type in INTERACTIONS:
            cooc.learn_one(e.user_id, e.item_id, e.ts)
            pop.learn_one(e.item_id, e.ts, cfg.strengths[e.type])
    pairs = {
        item: {other: float(cooc.decay.decayed(v, now)) for other, v in row.items()}
        for item, row in cooc.pairs.items()
    }
    occ = {item: float(cooc.decay.decayed(v, now)) for item, v in cooc.occurrences.items()}
    return pairs, occ, {item: pop.score(item, now) for item in pop.scores}


def _identified(raw: list[dict]) -> list[Event]:
    return [
        Event(e["type"], e["user_id"], e["item_id"], e["ts"], e.get("value"), e["event_id"])
        for e in raw
    ]


async def _dumps(redis: Redis, keys: Keys, stamped: bool = True) -> dict[str, bytes]:
    """Every key under ``keys``' prefix (named without it) -> its DUMP; without ``stamped``,
    less the wall-clock stamps and counters that differ from run to run."""
    skip = (
        set()
        if stamped
        else {
            keys.updated_items,
            keys.relisted_items,
            keys.active_items,
            keys.dirty_users,
            keys.worker_stats,
        }
    )
    names = [k.decode() async for k in redis.scan_iter(match=f"{keys.prefix}:*")]
    names = [n for n in names if n not in skip]
    dumps = [await redis.dump(n) for n in names]
    return {n.replace(keys.prefix, ""): d for n, d in zip(names, dumps, strict=True)}


def test_an_event_id_seen_before_is_learned_once(settings: Settings, atomic: bool) -> None:
    """A producer's retry or a file replayed again repeats event ids. Repeats within a batch
    and of earlier batches are dropped and counted, and the state is key for key the one the
    stream builds without them; events without an id are never dropped."""
    events = _identified(generate(SynthConfig(users=30, items=40, events=600, seed=9)).events)
    cfg = dataclasses.replace(settings.model_config(), dedup_events=100)
    rng = np.random.default_rng(2)

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)
        once = Keys(f"{settings.key_prefix}:once")
        twice = Keys(f"{settings.key_prefix}:twice")
        plain = BatchUpdater(redis, once, cfg, atomic, write_target_s=math.inf)
        repeated = BatchUpdater(redis, twice, cfg, atomic, write_target_s=math.inf)
        dropped = 0
        for start in range(0, len(events), 40):  # each call one step (the first is 100 events)
            batch = events[start : start + 40]
            await plain.apply(batch)
            within = [batch[n] for n in rng.choice(len(batch), 10, replace=False)]
            before = [events[n] for n in rng.choice(max(start, 1), 10)] if start else []
            result = await repeated.apply(batch + within + before)
            assert result.events == len(batch)
            assert result.duplicates == result.skipped == len(within) + len(before)
            dropped += result.duplicates
        assert dropped == 10 * 15 + 10 * 14
        assert await _dumps(redis, twice, stamped=False) == await _dumps(redis, once, stamped=False)
        # A batch of nothing but repeats still moves its partition's watermark past them.
        result = await repeated.apply(events[:5], [("t/0", n) for n in range(5)])
        assert (result.events, result.duplicates) == (0, 5)
        assert int(await redis.get(twice.watermark("t/0"))) == 4
        # Without ids, the same event twice is two events.
        anonymous = dataclasses.replace(events[-1], event_id=None, ts=events[-1].ts + 1)
        result = await repeated.apply([anonymous, anonymous])
        assert (result.events, result.duplicates) == (2, 0)
        # With no ids kept, nothing is recognised.
        off = BatchUpdater(redis, twice, dataclasses.replace(cfg, dedup_events=0), atomic)
        result = await off.apply([events[-1], events[-1]])
        assert (result.events, result.duplicates) == (2, 0)
        await redis.aclose()

    asyncio.run(run())


def test_a_worker_with_another_half_life_refuses_the_state_and_writes_nothing(
    settings: Settings, atomic: bool
) -> None:
    """The forward-decayed sums grow at the rate stored with their first landmark; a worker
    adding to them at another would mix two scales in one sum. It refuses the batch before any
    write, with both half-lives in the error; a worker at the state's rate goes on."""
    events = _events(generate(SynthConfig(users=20, items=30, events=200, seed=3)).events)
    cfg = settings.model_config()
    other = dataclasses.replace(cfg, decay_half_life_s=cfg.decay_half_life_s / 2)

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)
        keys = Keys(settings.key_prefix)
        await BatchUpdater(redis, keys, cfg, atomic).apply(events[:100])
        assert float(await redis.get(keys.decay_rate)) == cfg.decay_rate
        before = await _dumps(redis, keys)
        with pytest.raises(DecayRateMismatch, match=r"half-life of 2\.592e\+06 s .* 1\.296e\+06 s"):
            await BatchUpdater(redis, keys, other, atomic).apply(events[100:])
        assert await _dumps(redis, keys) == before
        await BatchUpdater(redis, keys, cfg, atomic).apply(events[100:])
        assert await _dumps(redis, keys) != before
        await redis.aclose()

    asyncio.run(run())


def test_decayed_cooccurrence_and_popularity_in_redis_equal_the_learners_across_rebases(
    settings: Settings, atomic: bool
) -> None:
    stream = generate(SynthConfig(users=60, items=80, events=6_000, duration_s=4 * 86400, seed=5))
    events = _events(stream.events)
    span = events[-1].ts - events[0].ts
    # A half-life short enough that the forward-decay exponent passes the rebase threshold
    # twice over the stream, long enough that recent evidence stays well above underflow.
    half_life = span * math.log(2) / (2.5 * REBASE_EXPONENT)
    cfg = dataclasses.replace(
        settings.model_config(),
        decay_half_life_s=half_life,
        neighbours_cap=10_000,
        cooccurrence_history=40,  # short enough that some users' histories pass it
    )

    async def run() -> tuple[dict, dict, dict, float, int]:
        redis = Redis.from_url(settings.redis_url)
        keys = Keys(settings.key_prefix)
        landmarks = set()
        updater = BatchUpdater(redis, keys, cfg, atomic)
        for start in range(0, len(events), 250):
            await updater.apply(events[start : start + 250])
            landmarks.add(float(await redis.get(keys.decay_landmark)))
        landmark = float(await redis.get(keys.decay_landmark))
        items = sorted({e.item_id for e in events})
        cooc = {}
        for item in items:
            row = await redis.zrange(keys.neighbours(item), 0, -1, withscores=True)
            cooc[item] = {m.decode(): v for m, v in row}
        occ = {
            m.decode(): v for m, v in await redis.zrange(keys.occurrences, 0, -1, withscores=True)
        }
        pop = {
            m.decode(): v for m, v in await redis.zrange(keys.popularity, 0, -1, withscores=True)
        }
        await redis.aclose()
        return cooc, occ, pop, landmark, len(landmarks)

    cooc, occ, pop, landmark, landmarks_seen = asyncio.run(run())
    assert landmarks_seen >= 3, "the stream should have forced at least two rebases"
    now = events[-1].ts
    scale = math.exp(-cfg.decay_rate * (now - landmark))  # stored forward sums -> decayed values
    expected_cooc, expected_occ, expected_pop = _learned_alone(events, cfg, now)

    def close(stored: float, expected: float) -> bool:
        return math.isclose(stored * scale, expected, rel_tol=1e-9, abs_tol=1e-12)

    assert set(occ) == set(expected_occ)
    assert all(close(occ[i], expected_occ[i]) for i in expected_occ)
    assert all(close(pop[i], expected_pop[i]) for i in expected_pop)
    pairs = 0
    for item, row in expected_cooc.items():
        assert set(cooc[item]) == set(row), item
        for other, value in row.items():
            assert close(cooc[item][other], value), (item, other, cooc[item][other] * scale, value)
            pairs += 1
    assert pairs > 1000 and max(expected_occ.values()) > 0.5  # recent sums far from underflow


def test_a_batch_read_before_another_workers_rebase_is_learned_again_at_the_new_scale(
    settings: Settings,
) -> None:
    """Worker A reads at landmark L and computes its forward-decayed amounts; worker B's event,
    far later, rebases to L' before A writes. A's write is refused and learned again at L', so
    its old click weighs what it should, not e^(rate (L' - L)) times more."""
    cfg = dataclasses.replace(settings.model_config(), decay_half_life_s=1_000.0)
    old = Event("click", "ua", "stale", 100.0)
    late = Event("click", "ub", "fresh", 800_000.0)

    class Interleaved(BatchUpdater):
        """An updater whose first write comes after another worker's batch."""

        other: BatchUpdater
        before_write: list[Event]

        async def _write_script(self, *args: object, **kwargs: object) -> None:
            if self.before_write:
                batch, self.before_write = self.before_write, []
                await self.other.apply(batch)
            await super()._write_script(*args, **kwargs)  # type: ignore[arg-type]

    async def run() -> tuple[dict[str, float], float]:
        redis = Redis.from_url(settings.redis_url)
        keys = Keys(settings.key_prefix)
        first = Interleaved(redis, keys, cfg, atomic=True)
        first.other, first.before_write = BatchUpdater(redis, keys, cfg, atomic=True), [late]
        await first.apply([old])
        pop = {
            m.decode(): v for m, v in await redis.zrange(keys.popularity, 0, -1, withscores=True)
        }
        landmark = float(await redis.get(keys.decay_landmark))
        await redis.aclose()
        return pop, landmark

    pop, landmark = asyncio.run(run())
    assert landmark == late.ts  # B rebased
    now = late.ts
    _, _, expected = _learned_alone([old, late], cfg, now)
    scale = math.exp(-cfg.decay_rate * (now - landmark))
    assert set(pop) == {"stale", "fresh"}
    for item, value in expected.items():
        assert math.isclose(pop[item] * scale, value, rel_tol=1e-9, abs_tol=1e-300), (item, pop)


def test_two_processes_hammering_one_item_lose_no_increment(
    settings: Settings, redis_client, atomic: bool
) -> None:
    script = Path(__file__).with_name("hammer.py")
    workers, batches, per_batch = 2, 40, 50
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                settings.redis_url,
                settings.key_prefix,
                str(n),
                str(workers),
                str(batches),
                str(per_batch),
                str(int(atomic)),
            ]
        )
        for n in range(workers)
    ]
    for proc in procs:
        assert proc.wait(120) == 0
    total = workers * batches * per_batch
    prefix = settings.key_prefix
    # Every event has the same time, so each forward-decay weight is exactly 1.
    assert redis_client.zscore(Keys(prefix).occurrences, "hot") == total
    assert redis_client.zscore(Keys(prefix).clicks, "hot") == total
    assert redis_client.zscore(Keys(prefix).popularity, "hot") == total * settings.weight_click
    assert int(redis_client.hget(f"{prefix}:stats:worker", "events")) == total
    # Raw vector increments from both processes, applied by the server script.
    bumped = decode_vector(redis_client.get(f"{prefix}:bump"))
    np.testing.assert_array_equal(bumped, np.full(4, float(workers * batches)))


def test_a_vector_written_between_a_batchs_read_and_write_keeps_both_changes(
    settings: Settings, redis_client, atomic: bool
) -> None:
    """Where no other worker wrote a vector since the batch read it, the script sets the
    batch's result; where one did, it adds the batch's delta to what is there now. Either way
    the stored vector is the stored float32 values plus the float32 delta, summed in double
    precision and rounded once, as the script's own arithmetic does."""
    keys = Keys(settings.key_prefix)
    config = ModelConfig(factors=4, implicit_negatives=0)
    key = keys.item_vector("hot")
    bump = np.arange(1, vector_width(4) + 1, dtype=np.float32) / 8
    seen: dict[str, np.ndarray] = {}

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)
        try:
            updater = BatchUpdater(redis, keys, config, atomic)
            await updater.apply([Event("click", "u0", "hot", TS)])
            learn = updater.learner.learn_many
            another_worker_writes = False

            def learn_then_maybe_another_worker_writes(events, snapshot):
                changes = learn(events, snapshot)
                seen["delta"] = changes.deltas["i:hot"].astype(np.float32)
                seen["base"] = changes.bases["i:hot"].astype(np.float32)
                if another_worker_writes:
                    stored = decode_vector(redis_client.get(key)).astype(np.float32)
                    seen["theirs"] = stored + bump
                    redis_client.set(key, seen["theirs"].astype("<f4").tobytes())
                return changes

            updater.learner.learn_many = learn_then_maybe_another_worker_writes
            await updater.apply([Event("click", "u1", "hot", TS)])
            seen["alone"] = decode_vector(redis_client.get(key)).astype(np.float32)
            seen["alone_expected"] = _summed(seen["base"], seen["delta"])
            another_worker_writes = True
            await updater.apply([Event("click", "u2", "hot", TS)])
        finally:
            await redis.aclose()

    asyncio.run(run())
    np.testing.assert_array_equal(seen["alone"], seen["alone_expected"])
    stored = decode_vector(redis_client.get(key)).astype(np.float32)
    np.testing.assert_array_equal(stored, _summed(seen["theirs"], seen["delta"]))
    assert not np.array_equal(stored, _summed(seen["base"], seen["delta"]))


def test_a_write_with_more_members_than_one_zadd_chunk_sets_every_one(
    settings: Settings, redis_client, atomic: bool
) -> None:
    """One step of 1,500 first-seen items: the write script's ZADDs take them in chunks of
    `MEMBERS_PER_COMMAND`, and every item gets its own time."""
    keys = Keys(settings.key_prefix)
    count = MEMBERS_PER_COMMAND + 500
    events = [Event("click", f"u{n}", f"i{n}", TS + n) for n in range(count)]

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)
        try:
            updater = BatchUpdater(redis, keys, ModelConfig(factors=4), atomic)
            updater.step.events = count  # one step, not the first step's hundred
            result = await updater.apply(events)
            assert result.events == count
        finally:
            await redis.aclose()

    asyncio.run(run())
    first_seen = dict(redis_client.zrange(keys.item_first_seen, 0, -1, withscores=True))
    assert first_seen == {f"i{n}".encode(): TS + n for n in range(count)}
    assert redis_client.zcard(keys.updated_items) == count
    occurrences = dict(redis_client.zrange(keys.occurrences, 0, -1, withscores=True))
    assert len(occurrences) == count and min(occurrences.values()) > 0  # increments, chunked
    assert redis_client.zcard(keys.active_items) == count
    history = redis_client.zrange(keys.history(f"u{count - 1}"), 0, -1, withscores=True)
    assert history == [(f"i{count - 1}".encode(), TS + count - 1)]


def test_the_write_helpers_add_to_what_is_stored_exactly_past_one_chunk(
    settings: Settings, redis_client
) -> None:
    """Past `MEMBERS_PER_COMMAND` members, onto members already stored: each score is the stored
    double plus its amount, as a ZINCRBY each would leave it; each rating pair the float32 of the
    summed statistics; and the records keep their order, newest first."""
    keys, scripts = Keys(settings.key_prefix), ServerScripts(redis_client)
    rng = np.random.default_rng(5)
    count, new = MEMBERS_PER_COMMAND + 500, 100  # the last `new` members are not stored yet
    members = [f"m{n}" for n in range(count)]
    stored, amounts = (rng.normal(size=count) * 1e3).tolist(), rng.normal(size=count).tolist()

    scored = keys.neighbours("chunked")
    redis_client.zadd(scored, dict(zip(members[:-new], stored[:-new], strict=True)))
    pairs = [x for member, amount in zip(members, amounts, strict=True) for x in (member, amount)]
    assert scripts.zincrby_many(keys=[scored], args=[0, 0, *pairs]) == count
    scores = dict(redis_client.zrange(scored, 0, -1, withscores=True))
    expected = [old + amount for old, amount in zip(stored, amounts, strict=True)]
    assert [scores[m.encode()] for m in members] == expected[:-new] + amounts[-new:]

    pair_key = keys.rating_pairs("chunked")
    old = rng.normal(size=(count, 4)).astype(np.float32)
    delta = rng.normal(size=(count, 4)).astype(np.float32)
    redis_client.hset(pair_key, mapping={m: old[n].tobytes() for n, m in enumerate(members[:-new])})
    old[-new:] = 0.0
    assert scripts.add_rating_pairs(keys=[pair_key], args=[count, delta.tobytes(), *members])
    kept = redis_client.hgetall(pair_key)
    summed = (old.astype(np.float64) + delta.astype(np.float64)).astype(np.float32)
    assert all(kept[m.encode()] == summed[n].tobytes() for n, m in enumerate(members))

    records_key = keys.rating_history("chunked")
    redis_client.rpush(records_key, b"older")
    records = [f"record {n}".encode() for n in range(count)]  # oldest first
    assert scripts.push_records(keys=[records_key], args=[count, 0, *records]) == count
    assert redis_client.lrange(records_key, 0, -1) == records[::-1][:count]


def _summed(stored: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """float32 ``stored + delta`` as the write script computes it."""
    return (stored.astype(np.float64) + delta.astype(np.float64)).astype(np.float32)


def _dump(redis_client, prefix: str) -> dict:
    out = {}
    for key in sorted(redis_client.scan_iter(match=f"{prefix}:*")):
        kind = redis_client.type(key).decode()
        if key.endswith(b":stats:worker"):
            out[key] = redis_client.hget(key, "events")
        elif kind == "string":
            out[key] = redis_client.get(key)
        elif kind == "zset":
            out[key] = redis_client.zrange(key, 0, -1, withscores=True)
        elif kind == "hash":
            out[key] = redis_client.hgetall(key)
    return out


def test_a_redelivered_batch_is_applied_once(
    settings: Settings, redis_client, atomic: bool
) -> None:
    stream = generate(SynthConfig(users=30, items=40, events=400, seed=9))
    events = _events(stream.events)
    origins = [("freshrec.events/0", offset) for offset in range(len(events))]

    async def apply(lo: int, hi: int):
        redis = Redis.from_url(settings.redis_url)
        try:
            updater = BatchUpdater(
                redis, Keys(settings.key_prefix), settings.model_config(), atomic
            )
            return await updater.apply(events[lo:hi], origins[lo:hi])
        finally:
            await redis.aclose()

    first = asyncio.run(apply(0, 200))
    assert first.events == 200 and first.skipped == 0
    state = _dump(redis_client, settings.key_prefix)
    again = asyncio.run(apply(0, 200))  # Kafka delivers the same batch twice
    assert again.events == 0 and again.skipped == 200 and again.applied == []
    assert _dump(redis_client, settings.key_prefix) == state
    overlap = asyncio.run(apply(150, 300))  # half seen before, half new
    assert overlap.skipped == 50 and overlap.events == 100
    assert overlap.applied == list(range(50, 150))  # the positions of the new half
    assert int(redis_client.hget(f"{settings.key_prefix}:stats:worker", "events")) == 300
    assert int(redis_client.get(Keys(settings.key_prefix).watermark("freshrec.events/0"))) == 299


@pytest.mark.parametrize(
    ("max_events", "target_s"), [(7, WRITE_TARGET_S), (MAX_EVENTS_PER_WRITE, 1e-9)]
)
def test_a_long_batch_is_written_in_steps_of_whole_messages_each_once(
    settings: Settings, redis_client, max_events: int, target_s: float
) -> None:
    """Steps of at most 7 events, or of one message each (no write is fast enough for more),
    over messages of 3: each step ends between messages, so the offset watermark a step writes
    never skips the rest of a message in the next one."""
    stream = generate(SynthConfig(users=30, items=40, events=300, seed=9))
    events = _events(stream.events)
    origins = [("freshrec.events/0", n // 3) for n in range(len(events))]
    keys = Keys(settings.key_prefix)

    async def apply(lo: int, hi: int):
        redis = Redis.from_url(settings.redis_url)
        try:
            updater = BatchUpdater(
                redis, keys, settings.model_config(), max_events=max_events, write_target_s=target_s
            )
            result = await updater.apply(events[lo:hi], origins[lo:hi])
            if target_s < 1e-6 and result.events:  # any write is too slow for more
                assert updater.step.events == 1
            return result
        finally:
            await redis.aclose()

    first = asyncio.run(apply(0, 300))
    assert first.events == 300 and first.skipped == 0 and first.applied == list(range(300))
    assert int(redis_client.hget(keys.worker_stats, "events")) == 300
    assert int(redis_client.get(keys.watermark("freshrec.events/0"))) == 99
    again = asyncio.run(apply(150, 300))
    assert again.events == 0 and again.skipped == 150


def test_impressions_at_wall_time_leave_an_old_logs_decay_alone(
    settings: Settings, atomic: bool
) -> None:
    """Replaying a 1997 log while readers stamp impressions with today's time: the decay's
    landmark and sums follow the events only, and the state's clock is the newest event."""
    keys = Keys(settings.key_prefix)
    old = 875_000_000.0
    events = [Event("click", f"u{n % 3}", f"i{n % 5}", old + n) for n in range(30)]
    wall = [Event("impression", "u0", f"i{n}", 1.8e9) for n in range(5)]

    async def run() -> tuple[float, float, float, float]:
        redis = Redis.from_url(settings.redis_url)
        updater = BatchUpdater(redis, keys, settings.model_config(), atomic)
        await updater.apply(wall)  # before any event: must not become the landmark
        await updater.apply(events[:15])
        await updater.apply(wall + events[15:])  # in one batch with events: no rebase
        landmark = float(await redis.get(keys.decay_landmark))
        clock = float(await redis.get(keys.event_clock))
        occurrences = await redis.zscore(keys.occurrences, "i0")
        impressions = await redis.zscore(keys.impressions, "i0")
        await redis.aclose()
        return landmark, clock, occurrences, impressions

    landmark, clock, occurrences, impressions = asyncio.run(run())
    assert landmark == old and clock == old + 29
    cfg = settings.model_config()
    expected = Cooccurrence(cfg.cooccurrence_history, cfg.decay_rate, old)
    for e in events:
        expected.learn_one(e.user_id, e.item_id, e.ts)
    assert occurrences == pytest.approx(expected.occurrences["i0"], rel=1e-12)
    assert impressions == 2


def test_a_rebase_whose_lock_expired_leaves_the_new_holders_lock_and_rescales_nothing(
    settings: Settings,
) -> None:
    """Worker A's rebase outlives its lock; worker B takes the lock meanwhile. A must neither
    rescale beside B nor delete B's lock on its way out."""
    cfg = dataclasses.replace(settings.model_config(), decay_half_life_s=1_000.0)

    class Outlived(BatchUpdater):
        async def _rescaled_keys(self, lock: str, token: str) -> list[str | bytes] | None:
            targets = await super()._rescaled_keys(lock, token)
            await self.redis.set(lock, "worker-b", px=60_000)  # A's expired; B took it
            return targets

    async def run() -> tuple[bytes | None, tuple[float, float | None], tuple[float, float | None]]:
        redis = Redis.from_url(settings.redis_url)
        keys = Keys(settings.key_prefix)
        updater = Outlived(redis, keys, cfg, atomic=True)
        await updater.apply([Event("click", "ua", "item", 100.0)])

        async def state() -> tuple[float, float | None]:
            landmark = float(await redis.get(keys.decay_landmark))
            return landmark, await redis.zscore(keys.popularity, "item")

        before = await state()
        await updater.rebase(ForwardDecay(cfg.decay_rate, before[0]), 5_000.0)
        held = await redis.get(keys.decay_rebase_lock)
        after = await state()
        await redis.delete(keys.decay_rebase_lock)
        await redis.aclose()
        return held, before, after

    held, before, after = asyncio.run(run())
    assert held == b"worker-b"
    assert after == before
