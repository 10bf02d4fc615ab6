"""`freshrec eval`: prequential evaluation through the real system, in process and end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from freshrec.devenv import local_services
from freshrec.evaluation.backends import DirectBackend
from freshrec.evaluation.fetch import ensure_dataset
from freshrec.evaluation.prequential import run_eval
from freshrec.evaluation.synth import SynthConfig, SynthStream, generate, write_jsonl
from freshrec.serving import funnel as funnel_module
from freshrec.serving import item_index as item_index_module
from freshrec.settings import Settings
from freshrec.store import batch_update as batch_update_module

pytestmark = pytest.mark.integration

REQUIRED = ("events", "mae", "rmse", "hr@10", "hr@20", "ndcg@10", "mrr", "coverage")
RATING_KEYS = ("mae", "rmse")
TOPN_KEYS = ("hr@10", "hr@20", "ndcg@10", "mrr", "coverage")
BASELINES = ("popularity", "item_knn", "river_biased_mf", "river_biased_mf_docs")
RANKERS_ONLY = ("item_knn",)  # no rating predictions
REAL_SLICE = 5_000
"""The first events of MovieLens 100K that CI evaluates through both modes."""
AGREEMENT = 0.03
"""Pipeline and direct mode agree within this share on every metric of the real slice."""
SMALL = SynthConfig(users=150, items=200, events=2500, seed=3)
# Known factors, with events enough per user (50) for taste to be learnable within a test.
KNOWN = SynthConfig(users=300, items=300, events=15_000, seed=5)


@pytest.fixture(scope="module")
def base_settings(endpoints: local_services.Endpoints) -> Settings:
    """The session's services; every eval run makes (and deletes) its own topics and keys."""
    return dataclasses.replace(
        Settings.from_env(),
        kafka_bootstrap=endpoints.kafka_bootstrap,
        redis_url=endpoints.redis_url,
        partitions=2,
        batch_within_s=0.02,
    )


def _written(stream: SynthStream, folder: Path) -> Path:
    path = folder / "stream.jsonl"
    write_jsonl(stream.events, path)
    return path


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _written(generate(SMALL), tmp_path_factory.mktemp("small"))


def test_json_summary_has_every_required_key_and_a_report(
    base_settings: Settings, small_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    command = [sys.executable, "-m", "freshrec.cli", "eval", str(small_file), "--json"]
    freshness = ["--freshness", "--freshness-lags", "1,600"]
    done = subprocess.run(
        [*command, "--mode", "direct", "--out", str(out), *freshness],
        env={**os.environ, **base_settings.environ()},
        capture_output=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    summary = json.loads(done.stdout)  # one JSON object, nothing else on stdout
    assert summary["events"] == SMALL.events and summary["skipped"] == 0
    assert summary["mode"] == "direct" and summary["events_per_s"] > 0
    assert summary["protocol"] == "lag" and summary["lag_s"] == 1.0 and summary["chunk"] is None
    assert summary["rating_events"] > 0 and summary["topn_events"] > 0
    for key in REQUIRED:
        assert math.isfinite(summary[key]), key
    assert set(summary["baselines"]) == set(BASELINES)
    for name in BASELINES:
        keys = TOPN_KEYS if name in RANKERS_ONLY else RATING_KEYS + TOPN_KEYS
        for key in keys:
            assert math.isfinite(summary["baselines"][name][key]), (name, key)
    assert summary["baselines"]["item_knn"]["rmse"] is None
    assert 0 < summary["hr@10"] <= summary["hr@20"] <= 1
    assert summary["ndcg@10"] <= summary["hr@10"] and summary["mrr"] <= summary["hr@20"]
    # The targets split by the user's history in the state: every target in one segment.
    segments = summary["by_history"].values()
    assert sum(segment["targets"] for segment in segments) == summary["topn_events"]
    for name in ("freshrec", *BASELINES):
        hits = sum(seg[name]["hr@10"] * seg["targets"] for seg in segments if seg["targets"])
        assert hits / summary["topn_events"] == pytest.approx(
            summary["hr@10"] if name == "freshrec" else summary["baselines"][name]["hr@10"],
            abs=1e-5,
        ), name
    # The value of freshness: every system at every lag, the main run's lag not run twice.
    assert [entry["lag_s"] for entry in summary["freshness"]] == [1.0, 600.0]
    first, later = summary["freshness"]
    assert set(first["systems"]) == {"freshrec", *BASELINES}
    assert first["systems"]["freshrec"]["hr@10"] == summary["hr@10"]
    assert later["topn_events"] <= first["topn_events"]  # a longer lag learns fewer users
    for entry in summary["freshness"]:  # each lag's targets by history, as the main run's
        parts = entry["by_history"].values()
        assert sum(seg["targets"] for seg in parts) == entry["topn_events"]
        for name in ("freshrec", *BASELINES):
            hits = sum(seg[name]["hr@10"] * seg["targets"] for seg in parts if seg["targets"])
            assert hits / entry["topn_events"] == pytest.approx(
                entry["systems"][name]["hr@10"], abs=1e-5
            ), (entry["lag_s"], name)
    # Scored again on the targets every lag shares: the longest lag's, so its figures twice.
    assert first["same_targets"]["topn_events"] == later["topn_events"]
    assert later["same_targets"]["topn_events"] == later["topn_events"]
    for name in ("freshrec", *BASELINES):
        for key in ("hr@10", "ndcg@10"):
            assert later["same_targets"]["systems"][name][key] == pytest.approx(
                later["systems"][name][key], abs=1e-6
            ), (name, key)
    for name in ("summary.json", "report.md", "rmse.png", "hr10.png", "freshness.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "rmse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["rmse"] == summary["rmse"]
    assert "### By the user's history, lag 10 min" in (out / "report.md").read_text()


def test_a_lag_walked_in_a_process_of_its_own_equals_the_same_walk_alone(
    base_settings: Settings, small_file: Path
) -> None:
    # `--freshness` walks its other lags in processes of their own, beside the main walk.
    both = run_eval(
        base_settings, small_file, mode="direct", freshness_lags=(1.0, 600.0), show_progress=False
    )
    alone = run_eval(base_settings, small_file, mode="direct", lag_s=600.0, show_progress=False)
    row = both["freshness"][1]
    assert row["lag_s"] == 600.0 and row["topn_events"] == alone["topn_events"]
    ours = row["systems"]["freshrec"]
    assert ours == {key: alone[key] for key in ours}
    assert {name: row["systems"][name] for name in BASELINES} == alone["baselines"]
    assert row["by_history"] == alone["by_history"]
    assert both["freshness"][0]["systems"]["freshrec"]["rmse"] == both["rmse"]


class _SlowMachineClock:
    """``time`` as a module sees it on a machine a thousand times slower: each reading of the
    wall clock, the monotonic clock or the performance counter 5 s after the last."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += 5.0
        return self.now

    perf_counter = time = monotonic

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.parametrize("protocol", [{"lag_s": 1.0}, {"chunk": 500}], ids=["lag", "chunk"])
def test_a_direct_walk_gives_the_same_figures_however_fast_the_machine_runs(
    base_settings: Settings,
    small_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    protocol: dict[str, Any],
) -> None:
    """Direct mode follows the stream, not the wall clock: with the funnel's, the item index's
    and the updater's clocks a thousand times slower (every write looks slow, every snapshot
    stale), the choice ranker ends with the same weights, to the bit, and every figure is the
    same."""
    weights = []
    close = DirectBackend.close

    async def closing(backend: DirectBackend) -> None:
        weights.append(backend.funnel.choice_ranker.weights())
        await close(backend)

    monkeypatch.setattr(DirectBackend, "close", closing)
    walk = dict(mode="direct", show_progress=False, **protocol)
    runs = [run_eval(base_settings, small_file, **walk)]
    for module in (funnel_module, item_index_module, batch_update_module):
        monkeypatch.setattr(module, "time", _SlowMachineClock())
    runs.append(run_eval(base_settings, small_file, **walk))
    assert len(weights) == 2 and weights[0] == weights[1]
    assert any(weights[0].values())  # the ranker learned from the walk
    figures = ("rmse", "mae", "hr@10", "hr@20", "ndcg@10", "mrr", "coverage", "by_history")
    assert [{key: run[key] for key in figures} for run in runs[1:]] == [
        {key: runs[0][key] for key in figures}
    ]


def test_pipeline_rmse_is_within_one_percent_of_direct(
    base_settings: Settings, small_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = run_eval(base_settings, small_file, mode="direct", show_progress=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the run's logs go
    pipeline = run_eval(base_settings, small_file, mode="pipeline", show_progress=False)
    assert not list(tmp_path.glob("freshrec-eval-*"))  # a run that succeeded leaves no logs
    assert pipeline["events"] == direct["events"] == SMALL.events
    assert pipeline["rating_events"] == direct["rating_events"]
    assert pipeline["topn_events"] == direct["topn_events"]
    assert abs(pipeline["rmse"] - direct["rmse"]) <= 0.01 * direct["rmse"], (pipeline, direct)
    # The baselines learn in this process from the same batches: identical in both modes.
    assert pipeline["baselines"] == direct["baselines"]


def test_the_chunk_protocol_stays_and_excludes_the_lag(
    base_settings: Settings, small_file: Path
) -> None:
    summary = run_eval(base_settings, small_file, mode="direct", chunk=200, show_progress=False)
    assert summary["protocol"] == "chunk" and summary["chunk"] == 200
    assert summary["lag_s"] is None and summary["groups"] == math.ceil(SMALL.events / 200)
    with pytest.raises(ValueError, match="not both"):
        run_eval(base_settings, small_file, mode="direct", chunk=200, lag_s=1.0)


@pytest.fixture(scope="module")
def real_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first events of MovieLens 100K (fetched once into the cache), in time order."""
    path = ensure_dataset("ml-100k", Settings.from_env().home)
    lines = path.read_text().splitlines()
    header, rows = lines[0], [line.split("\t") for line in lines[1:]]
    rows.sort(key=lambda row: float(row[3]))  # stable: the order eval itself uses
    sliced = tmp_path_factory.mktemp("ml-100k") / "first.inter"
    sliced.write_text("\n".join([header, *("\t".join(r) for r in rows[:REAL_SLICE])]) + "\n")
    return sliced


@pytest.mark.timeout(1200)  # two walks of ~2,500 lag groups each on a shared two-core box
def test_real_data_pipeline_agrees_with_direct_and_freshrec_beats_the_baselines(
    base_settings: Settings, real_slice: Path
) -> None:
    direct = run_eval(base_settings, real_slice, mode="direct", show_progress=False)
    pipeline = run_eval(base_settings, real_slice, mode="pipeline", show_progress=False)
    assert direct["events"] == pipeline["events"] == REAL_SLICE
    assert direct["protocol"] == "lag" and direct["lag_s"] == 1.0
    assert pipeline["topn_events"] == direct["topn_events"] > 0
    assert pipeline["rating_events"] == direct["rating_events"] == REAL_SLICE
    for key in ("rmse", "mae", "hr@10", "hr@20", "ndcg@10", "mrr"):
        assert abs(pipeline[key] - direct[key]) <= AGREEMENT * direct[key], (key, pipeline, direct)
    assert direct["hr@10"] > direct["baselines"]["popularity"]["hr@10"], direct
    assert direct["hr@10"] > direct["baselines"]["item_knn"]["hr@10"], direct


def test_personal_model_beats_popularity_on_a_stream_with_known_factors(
    base_settings: Settings, tmp_path: Path
) -> None:
    stream = generate(KNOWN)
    # The chunk protocol the figures below were measured under: at a 1 s lag each of the
    # synthetic stream's events (80 s apart on average) is a group of its own, 15,000 groups.
    summary = run_eval(
        base_settings, _written(stream, tmp_path), mode="direct", chunk=200, show_progress=False
    )
    # Measured: HR@10 0.206 against 0.096 (2.1x); RMSE 0.652 against a floor of 0.485 (1.35x).
    # The README's full-size stream reaches 2.3x; asserted here is what holds with margin.
    popularity = summary["baselines"]["popularity"]
    assert summary["hr@10"] >= 1.5 * popularity["hr@10"], (summary, popularity)
    assert summary["ndcg@10"] >= 1.5 * popularity["ndcg@10"], (summary, popularity)
    assert summary["rmse"] < 1.5 * stream.noise_floor_rmse(), summary


def _ratings(n: int) -> list[tuple[str, str, int, int]]:
    stream = generate(SynthConfig(users=60, items=80, events=2 * n, rating_share=1.0, seed=9))
    return [
        (e["user_id"][1:], e["item_id"][1:], round(e["value"]), int(e["ts"]))
        for e in stream.events[:n]
    ]


@pytest.mark.parametrize(
    ("name", "fmt", "header", "line"),
    [
        ("u.data", "movielens-udata", "", "{}\t{}\t{}\t{}"),
        ("ratings.dat", "movielens-dat", "", "{}::{}::{}::{}"),
        ("ratings.csv", "csv", "userId,movieId,rating,timestamp\n", "{},{},{},{}"),
    ],
)
def test_every_ratings_format_of_the_contract_is_evaluated(
    base_settings: Settings, tmp_path: Path, name: str, fmt: str, header: str, line: str
) -> None:
    rows = _ratings(500)
    rows.reverse()  # files need not be in time order: eval sorts by event time
    text = header + "".join(line.format(*row) + "\n" for row in rows)
    path = tmp_path / name
    path.write_text(text + line.format("u", "i", "not-a-number", "0") + "\n")
    summary = run_eval(base_settings, path, mode="direct", limit=400, show_progress=False)
    assert summary["format"] == fmt
    assert summary["events"] == summary["rating_events"] == 400
    assert summary["skipped"] == 1
    assert math.isfinite(summary["rmse"]) and summary["rmse"] < 2.0


def test_a_file_without_ratings_reports_no_rating_error_and_stays_valid_json(
    base_settings: Settings, tmp_path: Path
) -> None:
    events = generate(SynthConfig(users=30, items=40, events=400, rating_share=0.0, seed=2))
    summary = run_eval(
        base_settings, _written(events, tmp_path), mode="direct", show_progress=False
    )
    assert summary["rating_events"] == 0
    assert summary["rmse"] is None and summary["mae"] is None
    assert summary["topn_events"] > 0 and math.isfinite(summary["hr@10"])
    json.loads(json.dumps(summary, allow_nan=False))


def test_recall_ablation_scores_each_channel_set_on_the_same_state(
    base_settings: Settings, small_file: Path
) -> None:
    summary = run_eval(base_settings, small_file, mode="direct", show_progress=False, ablation=True)
    ablation = summary["recall_ablation"]
    assert set(ablation) == {
        "all_channels",
        "mf_recall_only",
        "cf_recall_only",
        "mf_recall_alone",
        "cf_recall_alone",
        "fixed_blend",
    }
    for values in ablation.values():
        assert 0.0 <= values["hr@10"] <= values["hr@20"] <= 1.0
        # Not ordered by channels: a top 10 drawn from more candidates can cover fewer items
        # (under the lag protocol all channels covered less than MF recall alone).
        assert 0.0 < values["coverage"] <= 1.0
    with pytest.raises(ValueError, match="--ablation needs --mode direct"):
        run_eval(base_settings, small_file, mode="pipeline", show_progress=False, ablation=True)
