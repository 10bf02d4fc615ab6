"""``freshrec bench`` on tiny sizes: every figure and ratio is reported, and nothing is left behind.
The soak, briefly: every process sampled, the worker within its lag bound at 70 % of its maximum.
Freshness, briefly: every tracer event is found in a served and in a published list.
Memory: every user and item of a small stream is measured.

No timing is asserted: speed targets are goals the bench reports, measured side by side in one
run, not pass/fail conditions on a shared machine.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import redis
from confluent_kafka.admin import AdminClient

from freshrec.bench.freshness import format_freshness, run_freshness
from freshrec.bench.ingest import MEASUREMENTS, format_results, run_bench
from freshrec.bench.memory import format_memory, run_memory_bench, stream_events
from freshrec.bench.soak import (
    SustainedSearch,
    compact_append_only_files,
    format_soak,
    redis_forks,
    run_soak,
)
from freshrec.devenv import local_services
from freshrec.settings import Settings

pytestmark = pytest.mark.integration

SHORT_PIPELINE: dict[str, Any] = {
    "probe_s": 6.0,
    "serve_rps": 20.0,
    "probe_backlog": 2_000,
    "show_progress": False,
    "search": SustainedSearch(steps=2, settle_s=1.0, hold_s=3.0, sample_s=0.25),
}
"""The soak's and the freshness bench's pipeline, briefly: its maximum from a 6 s probe and
two paced holds of 4 s."""


def _bench_settings(endpoints: local_services.Endpoints) -> Settings:
    return dataclasses.replace(
        Settings.from_env(),
        kafka_bootstrap=endpoints.kafka_bootstrap,
        redis_url=endpoints.redis_url,
        partitions=2,
    )


def _assert_nothing_left(settings: Settings, topic_prefix: str, keys: str) -> None:
    """No topic or consumer group under ``topic_prefix``, no key matching the glob ``keys``."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "log_level": 3})
    assert not [t for t in admin.list_topics(timeout=10).topics if t.startswith(topic_prefix)]
    groups = admin.list_consumer_groups(request_timeout=10).result().valid
    assert not [g.group_id for g in groups if g.group_id.startswith(topic_prefix)]
    client = redis.Redis.from_url(settings.redis_url)
    try:
        assert not list(client.scan_iter(match=keys, count=1000))
    finally:
        client.close()


@pytest.fixture(scope="module")
def bench(endpoints: local_services.Endpoints) -> tuple[Settings, dict[str, Any]]:
    settings = _bench_settings(endpoints)
    results = run_bench(
        settings,
        events=400,
        repeat=1,
        show_progress=False,
        events_per_message=20,
        single_events=100,
    )
    return settings, results


def test_every_measurement_has_positive_figures(bench: tuple[Settings, dict[str, Any]]) -> None:
    _, results = bench
    measurements = results["measurements"]
    assert list(measurements) == list(MEASUREMENTS)
    for name, m in measurements.items():
        assert m["runs"] == 1, name
        assert m["events"] > 0 and m["events_per_s"] > 0, name
        if not name.startswith("direct"):
            assert m["messages"] > 0 and m["messages_per_s"] > 0, name
    assert measurements["pipeline"]["events"] == 400
    assert measurements["pipeline"]["messages"] < measurements["pipeline_single"]["messages"]
    assert measurements["pipeline_single"]["messages"] == 100


def test_every_ratio_is_reported_with_its_target(bench: tuple[Settings, dict[str, Any]]) -> None:
    _, results = bench
    ratios = results["ratios"]
    assert set(ratios) == {
        "pipeline_over_noop",
        "pipeline_single_over_noop_single",
        "pipeline_over_target",
        "pipeline_over_direct",
        "direct_drift_over_direct",
    }
    assert all(r["value"] > 0 for r in ratios.values())
    assert ratios["pipeline_over_noop"]["target"] == 0.7
    assert ratios["pipeline_over_target"]["target"] == 1.0


def test_results_print_as_a_table_and_as_json(bench: tuple[Settings, dict[str, Any]]) -> None:
    _, results = bench
    table = format_results(results)
    for name in MEASUREMENTS:
        assert name in table
    assert json.loads(json.dumps(results)) == results


def test_the_bench_leaves_no_topics_keys_or_groups(bench: tuple[Settings, dict[str, Any]]) -> None:
    settings, results = bench
    setup = results["setup"]
    _assert_nothing_left(settings, setup["topic_prefix"], f"{setup['key_prefix']}*")


def test_a_short_soak_samples_every_process_and_keeps_up(
    endpoints: local_services.Endpoints,
) -> None:
    """``freshrec bench --soak`` for about 20 s: a probe, a hold at 70 % of what it measured,
    memory of all three processes in every sample, a lag within its bound and no 5xx."""
    settings = _bench_settings(endpoints)
    results = run_soak(settings, seconds=12.0, sample_s=2.0, **SHORT_PIPELINE)
    assert json.loads(json.dumps(results)) == results
    rates = results["rates"]
    assert rates["max_events_per_s"] > 0 and rates["probe"]["batches"] >= 2
    _assert_the_highest_rate_held(rates["probe"], rates["max_events_per_s"])
    assert rates["target_events_per_s"] == pytest.approx(0.7 * rates["max_events_per_s"], 0.01)
    assert rates["applied_events_per_s"] > 0
    hold = [s for s in results["samples"] if s["phase"] == "hold"]
    assert len(hold) >= 6
    fields = ("worker_rss_mib", "reader_rss_mib", "redis_rss_mib", "redis_used_memory_mib")
    for sample in hold:
        assert all(sample[field] and sample[field] > 0 for field in fields), sample
    for field in fields:
        series = results["memory_mib"][field]
        assert series["start"] <= series["max"] and series["end"] <= series["max"]
        assert series["growth_per_min"] is not None
    lag = results["lag_events"]
    assert lag["end"] <= lag["bound"], lag
    assert results["serving"]["hold_requests"] > 0 and results["serving"]["errors_5xx"] == 0
    # The verdict itself also weighs the lag's trend, which a busy machine can tip in 12 s.
    assert results["ok"] == (not results["failures"])
    assert ("soak: ok" in format_soak(results)) == results["ok"]
    setup = results["setup"]
    _assert_nothing_left(settings, setup["topic_prefix"], f"{setup['key_prefix']}:*")


def test_every_tracer_event_is_seen_served_and_published(
    endpoints: local_services.Endpoints,
) -> None:
    """Freshness at a tenth of the measured maximum for 5 s: every tracer found in the list
    the reader serves and in the one it publishes, ordered figures, and nothing left behind.

    A tenth, not the bench's half: at half, the reader's publisher falls behind on this
    stream's many users (`bench/README.md`), and published lists can pass the deadline."""
    settings = _bench_settings(endpoints)
    results = run_freshness(
        settings, seconds=5.0, shares=(0.1,), tracers_per_s=4.0, settle_s=1.0, **SHORT_PIPELINE
    )
    assert json.loads(json.dumps(results)) == results
    assert results["max_events_per_s"] > 0
    _assert_the_highest_rate_held(results["probe"], results["max_events_per_s"])
    (level,) = results["levels"]
    assert level["target_events_per_s"] == pytest.approx(0.1 * results["max_events_per_s"], 0.01)
    assert level["applied_events_per_s"] > 0
    for path in ("served", "published"):
        figures = level[path]
        assert figures["tracers"] == figures["seen"] == 20 and figures["missing"] == 0, figures
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"], figures
    assert level["polls"]["requests"] >= 20 and level["polls"]["errors"] == 0
    assert level["redis_forks"] >= 0 and level["append_only_file_rewritten_s"] is not None
    assert level["serving"]["requests"] > 0
    # The share began once the worker had caught up on the impressions the probe left: within
    # a second of the serving load's, as its lag gauge read them at a tick after the pause.
    assert 0 <= level["impressions_waiting_at_start"] <= SHORT_PIPELINE["serve_rps"], level
    worker = level["worker"]  # the worker's own split of the time, from its /metrics
    assert worker["batches_per_s"] > 0 and worker["events_per_batch"] > 0, worker
    assert 0 < worker["applying_share"] <= 1.5, worker  # a batch can straddle the window's ends
    assert 0 < worker["kafka_to_redis_p50_ms"] <= worker["kafka_to_redis_p99_ms"], worker
    assert results["target"]["met"] is None  # no level at the target's half of the maximum
    table = format_freshness(results)
    assert " 10%" in table and "target:" in table
    setup = results["setup"]
    _assert_nothing_left(settings, setup["topic_prefix"], f"{setup['key_prefix']}:*")


def test_memory_per_user_and_per_item_counts_every_user_and_item_of_the_stream(
    endpoints: local_services.Endpoints,
) -> None:
    """Every user and item of the stream is found and measured, a user's history holds each
    distinct item they touched, the figures print, and the prefix is erased afterwards."""
    settings = _bench_settings(endpoints)
    stream, _ = stream_events(None, settings, users=300, items=100, events=3_000)
    histories: dict[str, set[str]] = {}
    for event in stream:
        histories.setdefault(event.user_id, set()).add(event.item_id)
    result = run_memory_bench(settings, users=300, items=100, events=3_000, show_progress=False)
    assert result["users"] == len(histories)
    assert result["items"] == len({event.item_id for event in stream})
    mean_history = sum(len(items) for items in histories.values()) / len(histories)
    assert result["mean_history"] == pytest.approx(mean_history, abs=0.05)
    assert result["bytes_per_user"] > 0 and result["bytes_per_item"] > 0
    assert result["bytes_per_waiting_user"] > 0
    assert result["learn_cpu_us_per_event"] > 0 and result["redis_cpu_us_per_event"] > 0
    assert "per user" in format_memory(result) and "of Redis's per event" in format_memory(result)
    _assert_nothing_left(settings, "freshrec-bench-memory", "fr-bench-memory-*")


def _assert_the_highest_rate_held(probe: dict[str, Any], maximum: float) -> None:
    """The maximum is the highest paced rate the search held, below the drain rate; each hold
    bisects what the ones before it left."""
    holds = probe["holds"]
    assert len(holds) == SHORT_PIPELINE["search"].steps
    assert maximum == max(h["events_per_s"] for h in holds if h["kept_up"])
    assert maximum < probe["drain_events_per_s"]
    low, high = 0.0, probe["drain_events_per_s"]
    for hold in holds:
        assert hold["events_per_s"] == pytest.approx((low + high) / 2, abs=1.0)
        low, high = (hold["events_per_s"], high) if hold["kept_up"] else (low, hold["events_per_s"])


def test_each_share_can_start_with_the_append_only_file_rewritten(
    endpoints: local_services.Endpoints,
) -> None:
    """The freshness bench has Redis rewrite its append-only file before each share and waits
    until it has: one more rewrite and one more fork on a server that keeps the file, none
    on one that does not."""
    store = redis.Redis.from_url(endpoints.redis_url)
    try:
        keeps_file = bool(int(store.info("persistence")["aof_enabled"]))
        rewrites, forks = int(store.info("persistence")["aof_rewrites"]), redis_forks(store)
        seconds = compact_append_only_files(store)
        assert seconds is not None and seconds >= 0
        state = store.info("persistence")
        assert not int(state["aof_rewrite_in_progress"]) and not int(state["aof_rewrite_scheduled"])
        assert (int(state["aof_rewrites"]) > rewrites) == keeps_file
        assert (redis_forks(store) > forks) == keeps_file
    finally:
        store.close()
