"""A sparse stream cut from a dense one: a share of its events, times rounded down to the day.

freshrec's defaults are held to more than the one real dataset this project ships with. A
stream with a tenth of ML-100K's ratings and day timestamps (about 10,000 ratings, 924 users,
1,250 items) has the shape of the sparse catalogues the defaults must also serve: few events per
user and item, and every event of a day predicted from the days before it (under the lag
protocol, events that share a time share a state). Samples with different seeds give the noise
of any figure measured on one.

Each event is kept independently with probability ``share`` (a seeded Bernoulli draw in file
order), so users and items keep their relative activity; kept times are floored to the day and
written in unix seconds, which `freshrec eval` detects on its own.

Usage::

    python -m freshrec.evaluation.thinned "$(freshrec data path ml-100k)" --seed 21 > sp21.csv
    freshrec eval sp21.csv --mode direct --json
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Iterator
from typing import IO, Any

import numpy as np

from freshrec.evaluation.datasets import RAW_KEY, read_events

DAY_S = 86400


def thinned(
    events: Iterable[dict[str, Any]], share: float, seed: int
) -> Iterator[tuple[str, str, float, int]]:
    """``(user, item, rating, day)`` of each rating of ``events`` kept with probability
    ``share``, in their order; ``day`` counts days since the unix epoch.

    Examples
    --------
    >>> events = [
    ...     {"type": "rating", "user_id": "u", "item_id": f"i{n}", "value": 4.0, "ts": 86400.0 * n}
    ...     for n in range(1000)
    ... ]
    >>> kept = list(thinned(events, 0.1, seed=21))
    >>> 70 < len(kept) < 130, kept[0][3] == int(kept[0][1][1:])  # the day of a kept event
    (True, True)
    >>> kept == list(thinned(events, 0.1, seed=21)) != list(thinned(events, 0.1, seed=22))
    True
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], not {share}")
    rng = np.random.default_rng(seed)
    for event in events:
        if RAW_KEY in event or event.get("type") != "rating":
            continue
        if rng.random() < share:
            day = int(float(event["ts"]) // DAY_S)
            yield event["user_id"], event["item_id"], float(event["value"]), day


def write_csv(rows: Iterable[tuple[str, str, float, int]], out: IO[str]) -> int:
    """``rows`` as the CSV `freshrec eval` reads (header ``user_id,item_id,rating,timestamp``,
    the timestamp the day's first second); the number written."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["user_id", "item_id", "rating", "timestamp"])
    count = 0
    for user, item, rating, day in rows:
        writer.writerow([user, item, f"{rating:g}", day * DAY_S])
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m freshrec.evaluation.thinned",
        description="Write a sparse sample of a ratings file, times floored to days, as CSV.",
    )
    parser.add_argument("file", help="any ratings file freshrec eval reads")
    parser.add_argument("--share", type=float, default=0.1, help="share of ratings kept")
    parser.add_argument("--seed", type=int, default=21, help="seed of the draw")
    args = parser.parse_args(argv)
    written = write_csv(thinned(read_events(args.file), args.share, args.seed), sys.stdout)
    print(f"{written} ratings written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
