"""How soon the drift detectors see an injected concept change, and how often they cry wolf.

A synthetic stream (`freshrec.evaluation.synth`) gets a change at a known event: a group of
users' factors rotate, or a new popular cluster of items appears. The stream is walked in
order, as the worker walks it: each rating is predicted by an online biased MF before it is
learned, and its absolute error feeds the monitor (the signal ``rating_error``); the item and
user ids of every event feed two `WindowDivergence` streams (``item_divergence``,
``user_divergence``). For each signal and detector, over several seeds, the report counts
the firings in the stable prefix (false alarms) and the delay, in events of the stream, from
the change to the first firing after it.

``python -m freshrec.evaluation.drift_detection --seeds 1 2 3 4 5`` prints the table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from freshrec.evaluation.synth import SynthConfig, generate
from freshrec.models.biased_mf import BiasedMF
from freshrec.models.config import ModelConfig
from freshrec.models.drift import PER_EVENT, PER_WINDOW, DriftMonitor, WindowDivergence
from freshrec.models.mf import VectorTable

__all__ = ["CHANGES", "WORLD", "DetectionRun", "detection_runs", "run_stream", "summarise"]

# The two changes the acceptance names, as SynthConfig fields.
CHANGES: dict[str, dict[str, Any]] = {
    "rotate_users": {"rotate_user_share": 0.5},
    "new_cluster": {"cluster_items": 20, "cluster_share": 0.5},
}
# A world small enough for an online MF to learn its users' tastes within the prefix (150
# users of 2 taste factors, about 100 ratings each before the change), where users pick
# items mostly by popularity (temperature 1), so that ratings, not only choices, carry the
# tastes a rotation changes; ratings with little noise. A rotation can only move the error
# of a model as far as the model had learned the tastes it turns: with 300 users of 8
# factors, the same MF's error rose by 0.02 to 0.07 of its deviation, below what a detector
# can tell from noise.
WORLD = SynthConfig(
    users=150,
    items=300,
    factors=2,
    events=40_000,
    rating_share=0.5,
    affinity_temperature=1.0,
    noise_std=0.2,
    change_at=30_000,
)
WATCHES = {
    "rating_error": PER_EVENT,
    "item_divergence": PER_WINDOW,
    "user_divergence": PER_WINDOW,
}


@dataclass(frozen=True)
class DetectionRun:
    """What one detector on one signal did on one seed's stream."""

    change: str
    seed: int
    signal: str
    detector: str
    false_alarms: int
    delay: int | None  # events from the change to the first firing at or after it; None: never


def run_stream(
    config: SynthConfig, model: ModelConfig | None = None, window: int = 500
) -> DriftMonitor:
    """Walk the stream of ``config`` prequentially, feeding a monitor; return the monitor.

    Each rating is predicted, its absolute error fed, then it is learned; every event's item
    and user feed windows of ``window`` events. Firings carry the position of the event that
    triggered them as their ``ts``.
    """
    model = model or ModelConfig()
    stream = generate(config)
    mf = BiasedMF(
        VectorTable(model.factors, model.init_std, model.seed),
        lr=model.lr,
        reg=model.reg,
        bias_lr=model.bias_lr,
        bias_shrinkage=model.bias_shrinkage,
    )
    monitor = DriftMonitor(WATCHES, history=10_000)
    items = WindowDivergence(window=window, reference_windows=5)
    users = WindowDivergence(window=window, reference_windows=5)
    for position, event in enumerate(stream.events):
        t = float(position)
        if event["type"] == "rating":
            user, item, rating = event["user_id"], event["item_id"], event["value"]
            monitor.update("rating_error", abs(rating - mf.predict_one(user, item)), t)
            mf.learn_one(user, item, rating)
        for value in items.update((event["item_id"],)):
            monitor.update("item_divergence", value, t)
        for value in users.update((event["user_id"],)):
            monitor.update("user_divergence", value, t)
    return monitor


def detection_runs(
    seeds: Sequence[int], base: SynthConfig, changes: Sequence[str] = tuple(CHANGES)
) -> list[DetectionRun]:
    """One `DetectionRun` per change, seed, signal and detector."""
    if base.change_at is None:
        raise ValueError("the base config needs change_at, the event of the change")
    runs = []
    for change in changes:
        for seed in seeds:
            config = replace(base, seed=seed, **CHANGES[change])
            monitor = run_stream(config)
            for signal in WATCHES:
                for detector in ("adwin", "page_hinkley"):
                    times = sorted(
                        f.ts
                        for f in monitor.firings
                        if (f.signal, f.detector) == (signal, detector)
                    )
                    after = [t for t in times if t >= base.change_at]
                    runs.append(
                        DetectionRun(
                            change,
                            seed,
                            signal,
                            detector,
                            false_alarms=len(times) - len(after),
                            delay=int(after[0]) - base.change_at if after else None,
                        )
                    )
    return runs


def summarise(runs: Sequence[DetectionRun]) -> list[dict[str, Any]]:
    """Per change, signal and detector: false alarms in all prefixes, delays over the seeds."""
    groups: dict[tuple[str, str, str], list[DetectionRun]] = {}
    for run in runs:
        groups.setdefault((run.change, run.signal, run.detector), []).append(run)
    out = []
    for (change, signal, detector), group in groups.items():
        delays = [r.delay for r in group if r.delay is not None]
        out.append(
            {
                "change": change,
                "signal": signal,
                "detector": detector,
                "seeds": len(group),
                "false_alarms": sum(r.false_alarms for r in group),
                "detected": len(delays),
                "max_delay": max(delays) if delays else None,
                "median_delay": sorted(delays)[len(delays) // 2] if delays else None,
            }
        )
    return out


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m freshrec.evaluation.drift_detection")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--change-at", type=int, default=30_000)
    parser.add_argument("--change", choices=tuple(CHANGES), action="append")
    parser.add_argument("--json", action="store_true", help="one JSON line per seed and run")
    args = parser.parse_args(argv)
    base = replace(WORLD, events=args.events, change_at=args.change_at)
    runs = detection_runs(args.seeds, base, args.change or tuple(CHANGES))
    if args.json:
        for run in runs:
            print(json.dumps(run.__dict__))
        return 0
    print(f"{'change':13} {'signal':16} {'detector':13} false alarms  detected  delay max/median")
    for row in summarise(runs):
        delay = f"{row['max_delay']}/{row['median_delay']}" if row["detected"] else "-"
        print(
            f"{row['change']:13} {row['signal']:16} {row['detector']:13} "
            f"{row['false_alarms']:>12}  {row['detected']:>4}/{row['seeds']:<3}  {delay}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
