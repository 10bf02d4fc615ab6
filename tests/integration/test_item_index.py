"""The reader's in-memory item matrix follows the vectors in Redis, incrementally."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from redis.asyncio import Redis

from freshrec.models.mf import implicit_part
from freshrec.serving.item_index import STATS, ItemIndex
from freshrec.settings import Settings
from freshrec.store.batch_update import BatchUpdater
from freshrec.store.keys import Keys
from freshrec.store.vectors import VECTOR_DTYPE, decode_vector
from freshrec.streams.events import Event

pytestmark = pytest.mark.integration
TS = 1_700_000_000.0


async def _clicked(
    settings: Settings, users: int, items: int
) -> tuple[Redis, BatchUpdater, ItemIndex]:
    """Items ``i0..`` clicked by users ``u0..`` in turn and learned; an index not yet loaded."""
    redis = Redis.from_url(settings.redis_url)
    keys, cfg = Keys(settings.key_prefix), settings.model_config()
    updater = BatchUpdater(redis, keys, cfg)
    await updater.apply([Event("click", f"u{n % users}", f"i{n}", TS + n) for n in range(items)])
    return redis, updater, ItemIndex(redis, keys, cfg.factors)


def test_the_index_loads_all_items_then_fetches_only_changed_ones(settings: Settings) -> None:
    cfg = settings.model_config()
    keys = Keys(settings.key_prefix)

    async def run() -> None:
        redis, updater, index = await _clicked(settings, users=7, items=50)
        assert await index.refresh() == 50 and len(index) == 50
        assert await index.refresh() == 0  # nothing changed since

        rows_before, lists_before = index.refreshed_at, index.relisted_at
        await updater.apply(
            [Event("click", "u1", "i3", TS + 100), Event("view", "u2", "new", TS + 101)]
        )
        stamped_rows = {
            m.decode()
            for m in await redis.zrangebyscore(keys.updated_items, f"({rows_before!r}", "+inf")
        }
        stamped_lists = {
            m.decode()
            for m in await redis.zrangebyscore(keys.relisted_items, f"({lists_before!r}", "+inf")
        }
        changed = await index.refresh()
        assert len(index) == 51
        # Rows fetched again: the two items of the batch and the sampled negatives it also moved,
        # not the items it paired them with (the histories of u1 and u2), whose neighbour lists
        # alone changed, and not the whole catalogue.
        assert changed == len(stamped_rows) <= 2 + 2 * cfg.implicit_negatives
        assert {"i3", "new"} <= stamped_rows
        assert stamped_lists == {"i3", "new"} | {f"i{n}" for n in range(50) if n % 7 in (1, 2)}
        for item in ("i3", "new", "i40"):
            stored = decode_vector(await redis.get(keys.item_vector(item)))
            row = index.matrix[index.rows[item]]
            np.testing.assert_allclose(row, implicit_part(stored, cfg.factors), rtol=1e-6)

        # Neighbour lists are read when a request needs them: the changed ones are stale until
        # then, and reading them once makes them current.
        lists = index.row_of(sorted(stamped_lists))
        assert (index.loaded[lists] != index.generation[lists]).all()
        unchanged = index.row_of([f"i{n}" for n in range(50) if f"i{n}" not in stamped_lists])
        await index.load_neighbours(unchanged)
        assert (index.loaded[unchanged] == index.generation[unchanged]).all()
        assert await index.refresh() == 0  # nothing changed since: every list stays current
        assert (index.loaded[unchanged] == index.generation[unchanged]).all()
        lists = index.row_of(["i3", "new", "i1"])
        assert (index.loaded[lists] != index.generation[lists]).all()
        await index.load_neighbours(lists)
        assert (index.loaded[lists] == index.generation[lists]).all()
        for item in ("i3", "new", "i1"):  # u1's click on i3 paired it with i1, among others
            stored = await redis.zrevrange(keys.neighbours(item), 0, index.width - 1, True)
            row = index.rows[item]
            held = [
                (index.ids[r], w)
                for r, w in zip(index.neighbours[row], index.neighbour_weights[row], strict=True)
                if r >= 0
            ]
            assert held == [(m.decode(), w) for m, w in stored] and held

        user = implicit_part(decode_vector(await redis.get(keys.user_vector("u1"))), cfg.factors)
        best = index.top(user, 5, exclude={"i3"})
        assert len(best) == 5 and "i3" not in [item for item, _ in best]
        scores = {
            item: float(index.matrix[row] @ user.astype(np.float32))
            for item, row in index.rows.items()
        }
        expected = sorted((i for i in scores if i != "i3"), key=lambda i: -scores[i])[:5]
        assert [item for item, _ in best] == expected
        await redis.aclose()

    asyncio.run(run())


def test_mf_search_over_a_large_catalogue_stays_exact_as_vectors_change(
    settings: Settings, redis_client
) -> None:
    """Past the flat-scan size the index keeps k-means cells; changed vectors fetched by a
    refresh are found at once, whatever cell they had."""
    from freshrec.bench.serve import build_state

    keys, factors = Keys(settings.key_prefix), settings.mf_factors
    build_state(redis_client, keys, items=4000, users=20, factors=factors)

    def check(index: ItemIndex, queries: np.ndarray) -> None:
        excluded = np.zeros(len(index.matrix), dtype=bool)
        excluded[::97] = True
        for y in queries:
            rows, scores = index.top_rows(y, 50, excluded)
            exact = index.matrix[: len(index)].astype(np.float64) @ y.astype(np.float64)
            exact[excluded[: len(index)]] = -np.inf
            assert len(rows) == 50 and not excluded[rows].any()
            np.testing.assert_allclose(scores, exact[rows], rtol=1e-5, atol=1e-5)
            assert exact[rows].min() >= np.sort(exact)[-50] - 1e-5  # none better left out

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)
        index = ItemIndex(redis, keys, factors)
        assert await index.refresh() == 4000
        assert index.cells.covered == 4000 and len(index.cells.radius) >= 8
        users = [decode_vector(redis_client.get(keys.user_vector(f"u{n}"))) for n in range(20)]
        check(index, np.array([implicit_part(u, factors) for u in users], dtype=np.float32))
        # 300 items move to where a query will find them best; the worker stamps them.
        target = np.random.default_rng(1).normal(0, 1.0, factors).astype(np.float32)
        moved = [f"i{n}" for n in range(0, 3000, 10)]
        server_now = float(redis_client.time()[0]) + 1.0
        for item in moved:
            vector = decode_vector(redis_client.get(keys.item_vector(item))).copy()
            y = implicit_part(vector, factors)
            y[:] = target + 0.01 * y
            redis_client.set(keys.item_vector(item), vector.astype(VECTOR_DTYPE).tobytes())
            redis_client.zadd(keys.updated_items, {item: server_now})
        assert await index.refresh() == len(moved)
        rows, _ = index.top_rows(target, 50, np.zeros(len(index.matrix), dtype=bool))
        assert {index.ids[r] for r in rows} <= set(moved)
        check(index, np.stack([target, *(-target[None, :])]))
        await redis.aclose()

    asyncio.run(run())


def test_the_index_holds_each_items_rating_bias(settings: Settings) -> None:
    """The ranking feature ``item_bias`` is the bias stored in the item's vector, refreshed as
    ratings move it; an item only clicked has none."""
    keys = Keys(settings.key_prefix)

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url)
        updater = BatchUpdater(redis, keys, settings.model_config())
        index = ItemIndex(redis, keys, settings.mf_factors)
        average = [Event("rating", f"u{n}", f"other{n}", TS + n, value=3.0) for n in range(6)]
        liked = [Event("rating", f"u{n}", "liked", TS + 10 + n, value=5.0) for n in range(6)]
        disliked = [Event("rating", f"u{n}", "disliked", TS + 20 + n, value=1.0) for n in range(6)]
        click = Event("click", "u0", "clicked", TS + 30)
        await updater.apply([*average, *liked, *disliked, click])
        await index.refresh()

        async def stored_bias(item: str) -> float:
            return float(decode_vector(await redis.get(keys.item_vector(item)))[0])

        bias = STATS.index("rating_bias")
        for item in ("liked", "disliked", "clicked"):
            held = index.stats[index.rows[item], bias]
            assert held == pytest.approx(await stored_bias(item), rel=1e-6), item
        held = {item: index.stats[index.rows[item], bias] for item in ("liked", "disliked")}
        assert held["liked"] > 0.1 > -0.1 > held["disliked"]
        assert index.stats[index.rows["clicked"], bias] == 0.0
        before = held["liked"]
        await updater.apply([Event("rating", "u9", "liked", TS + 40, value=1.0)])
        await index.refresh()
        assert index.stats[index.rows["liked"], bias] == pytest.approx(
            await stored_bias("liked"), rel=1e-6
        )
        assert index.stats[index.rows["liked"], bias] < before
        await redis.aclose()

    asyncio.run(run())
