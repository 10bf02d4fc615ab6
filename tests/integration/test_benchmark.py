"""``freshrec bench`` on tiny sizes: every figure and ratio is reported, and nothing is left behind.

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

from freshrec.bench.ingest import MEASUREMENTS, format_results, run_bench
from freshrec.devenv import local_services
from freshrec.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bench(endpoints: local_services.Endpoints) -> tuple[Settings, dict[str, Any]]:
    settings = dataclasses.replace(
        Settings.from_env(),
        kafka_bootstrap=endpoints.kafka_bootstrap,
        redis_url=endpoints.redis_url,
        partitions=2,
    )
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
    prefix = results["setup"]["topic_prefix"]
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "log_level": 3})
    assert not [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
    groups = admin.list_consumer_groups(request_timeout=10).result().valid
    assert not [g.group_id for g in groups if g.group_id.startswith(prefix)]
    client = redis.Redis.from_url(settings.redis_url)
    try:
        assert not list(client.scan_iter(match=f"{results['setup']['key_prefix']}*", count=1000))
    finally:
        client.close()
