"""Recall's compiled merge against a plain-Python recount of the same rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from freshrec.serving.recall import CF, COLD, MF, TRENDING, Recalled, Scratch, merge_channels

ITEMS = 40
WIDTH = 6


def _state(rng: np.random.Generator) -> dict[str, np.ndarray]:
    neighbours = np.full((ITEMS, WIDTH), -1, dtype=np.int64)
    weights = np.zeros((ITEMS, WIDTH))
    for item in range(ITEMS):
        kept = rng.integers(0, WIDTH + 1)
        others = rng.choice(np.delete(np.arange(ITEMS), item), size=kept, replace=False)
        neighbours[item, :kept] = others
        weights[item, :kept] = np.sort(rng.uniform(0.1, 5.0, kept))[::-1]
    return {
        "neighbours": neighbours,
        "neighbour_weights": weights,
        "occurrences": rng.uniform(0.0, 10.0, ITEMS),  # some below the floor: counted as it
        "count_floor": float(rng.uniform(0.5, 3.0)),
    }


def _recount(seen: np.ndarray, args: dict) -> tuple[list, list, list, list, list, list]:
    """The merge as the funnel's contract states it, one item at a time."""
    seeds, seed_weights, seed_slopes, neighbours, neighbour_weights = (
        args["seeds"],
        args["seed_weights"],
        args["seed_slopes"],
        args["neighbours"],
        args["neighbour_weights"],
    )
    occurrences, per_seed, channels = args["occurrences"], args["per_seed"], args["channels"]
    floor = args["count_floor"]
    cold_pool, cold_fresh, recall_cold = args["cold_pool"], args["cold_fresh"], args["recall_cold"]
    excluded = set(seen.tolist())
    cf: dict[int, float] = {}
    cf_slope: dict[int, float] = {}
    because: dict[int, int] = {}
    strong: set[int] = set()
    for seed, recency, slope in zip(
        seeds.tolist(), seed_weights.tolist(), seed_slopes.tolist(), strict=True
    ):
        for position, item in enumerate(neighbours[seed].tolist()):
            if item < 0 or item in excluded:
                continue
            cosine = neighbour_weights[seed, position] / math.sqrt(
                max(occurrences[seed], floor) * max(occurrences[item], floor)
            )
            because.setdefault(item, seed)
            cf[item] = cf.get(item, 0.0) + recency * cosine
            cf_slope[item] = cf_slope.get(item, 0.0) + slope * cosine
            if position < per_seed:
                strong.add(item)
    fresh = [n for n, row in enumerate(cold_pool.tolist()) if cold_fresh[n] and row not in excluded]
    cold = fresh[: recall_cold if channels & COLD else 0]
    lists = []
    if channels & CF:
        lists.append((CF, [item for item in cf if item in strong]))
    if channels & MF:
        lists.append((MF, args["mf"].tolist()))
    if channels & TRENDING:
        lists.append((TRENDING, args["trending"].tolist()))
    lists.append((COLD, [int(cold_pool[n]) for n in cold]))
    bits: dict[int, int] = {}
    for bit, rows in lists:
        for row in rows:
            if row not in excluded:
                bits[row] = bits.get(row, 0) | bit
    rows = list(bits)
    return (
        rows,
        [bits[r] for r in rows],
        [cf.get(r, 0.0) for r in rows],
        [because[r] if bits[r] & CF else -1 for r in rows],
        cold,
        [cf_slope.get(r, 0.0) for r in rows],
    )


@pytest.mark.parametrize("channels", [CF | MF | TRENDING | COLD, CF, MF | COLD, TRENDING, 0])
def test_the_merge_equals_a_plain_recount(channels: int) -> None:
    rng = np.random.default_rng(channels)
    scratch = Scratch()
    for _ in range(200):
        state = _state(rng)
        seen = rng.choice(ITEMS, size=rng.integers(0, 12), replace=False)
        args = {
            "seeds": seen[: rng.integers(0, len(seen) + 1)],
            "per_seed": int(rng.integers(0, WIDTH + 1)),
            "mf": rng.choice(ITEMS, size=rng.integers(0, 10), replace=False),
            "trending": rng.choice(ITEMS, size=rng.integers(0, 10), replace=False),
            "cold_pool": rng.choice(ITEMS, size=rng.integers(0, 15), replace=False),
            "recall_cold": int(rng.integers(0, 8)),
            "channels": channels,
            **state,
        }
        args["cold_fresh"] = rng.random(len(args["cold_pool"])) < 0.7
        ages = np.arange(len(args["seeds"])) / rng.uniform(0.5, 10.0)
        args["seed_weights"] = np.exp(-ages)
        args["seed_slopes"] = ages * np.exp(-ages)
        with scratch.seen(ITEMS, seen) as mask:
            out = Recalled(*merge_channels(mask, scratch.cf_slot, scratch.candidate_slot, **args))
        rows, bits, cf, because, cold, cf_slope = _recount(seen, args)
        assert out.rows.tolist() == rows
        assert out.channels.tolist() == bits
        np.testing.assert_allclose(out.cf, cf, rtol=1e-12)
        np.testing.assert_allclose(out.cf_slope, cf_slope, rtol=1e-12, atol=1e-15)
        assert out.because.tolist() == because
        assert out.cold.tolist() == cold
        slots = out.cold_slot.tolist()
        assert sorted(s for s in slots if s >= 0) == list(range(len(cold)))
        for row, slot, bit in zip(rows, slots, bits, strict=True):
            assert (slot >= 0) == bool(bit & COLD)
            assert slot < 0 or args["cold_pool"][cold[slot]] == row
    assert not scratch.seen_mask.any()  # every call leaves the scratch as it found it
    assert (scratch.cf_slot == -1).all() and (scratch.candidate_slot == -1).all()


def test_seen_items_are_never_candidates() -> None:
    rng = np.random.default_rng(3)
    state = _state(rng)
    seen = np.arange(0, ITEMS, 2)
    scratch = Scratch()
    with scratch.seen(ITEMS, seen) as mask:
        out = merge_channels(
            mask,
            scratch.cf_slot,
            scratch.candidate_slot,
            seeds=seen[:5],
            seed_weights=np.ones(5),
            seed_slopes=np.zeros(5),
            per_seed=WIDTH,
            mf=np.arange(ITEMS),
            trending=np.arange(ITEMS),
            cold_pool=np.arange(ITEMS),
            cold_fresh=np.ones(ITEMS, dtype=bool),
            recall_cold=ITEMS,
            channels=CF | MF | TRENDING | COLD,
            **state,
        )
    assert set(out[0].tolist()) == set(range(1, ITEMS, 2))
