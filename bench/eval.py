"""Eval throughput: how fast ``freshrec eval --mode direct`` walks a real stream.

``python -m freshrec.bench.eval`` evaluates the first ``--events`` events of MovieLens 100K
(fetched once into the cache) in direct mode, once per protocol asked for, and prints events
per second through freshrec (prediction and learning, the figure ``freshrec eval`` reports),
events per second in all (the baselines and the reading included) and this process's CPU
seconds, which a shared machine's load disturbs less than the wall clock. A benchmark, not a
timed test: compare figures taken next to each other.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from freshrec.evaluation.fetch import ensure_dataset
from freshrec.evaluation.prequential import run_eval
from freshrec.settings import Settings


def run_eval_bench(
    settings: Settings, events: int, protocols: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One direct-mode run per protocol (``{"lag_s": 1.0}`` or ``{"chunk": 1}``)."""
    path = ensure_dataset("ml-100k", settings.home)
    results = []
    for protocol in protocols:
        cpu, wall = time.process_time(), time.perf_counter()
        summary = run_eval(
            settings, path, mode="direct", limit=events, show_progress=False, **protocol
        )
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        results.append(
            {
                **protocol,
                "events": summary["events"],
                "groups": summary["groups"],
                "events_per_s": summary["events_per_s"],
                "events_per_s_all": round(summary["events"] / wall, 1),
                "cpu_s": round(cpu, 1),
                "wall_s": round(wall, 1),
            }
        )
    return results


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m freshrec.bench.eval")
    parser.add_argument("--events", type=int, default=20_000, help="first events of ML-100K")
    parser.add_argument("--lag", type=float, action="append", default=[], help="seconds")
    parser.add_argument("--chunk", type=int, action="append", default=[], help="events")
    args = parser.parse_args(argv)
    protocols: list[dict[str, Any]] = [{"lag_s": lag} for lag in args.lag]
    protocols += [{"chunk": chunk} for chunk in args.chunk]
    for result in run_eval_bench(Settings.from_env(), args.events, protocols or [{"lag_s": 1.0}]):
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
