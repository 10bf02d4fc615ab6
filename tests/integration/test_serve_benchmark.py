"""``freshrec bench serve`` on a tiny state: every figure is reported, nothing is left behind.

No latency is asserted (a shared machine); only that the load generator's requests all reached
a real reader and were answered, and that the run cleans up after itself.
"""

from __future__ import annotations

import dataclasses

import pytest
import redis

from freshrec.bench.serve import format_serve_results, run_serve_bench
from freshrec.devenv import local_services
from freshrec.settings import Settings

pytestmark = pytest.mark.integration


def test_bench_serve_answers_every_request_and_leaves_no_keys(
    endpoints: local_services.Endpoints,
) -> None:
    settings = dataclasses.replace(
        Settings.from_env(),
        kafka_bootstrap=endpoints.kafka_bootstrap,
        redis_url=endpoints.redis_url,
    )
    results = run_serve_bench(
        settings, items=2000, users=500, rates=(40.0, 80.0), seconds=1.0, show_progress=False
    )
    assert [r["target_rps"] for r in results["runs"]] == [40.0, 80.0]
    for run in results["runs"]:
        assert run["requests"] == int(run["target_rps"]) and run["errors"] == 0
        assert 0 < run["p50_ms"] <= run["p90_ms"] <= run["p99_ms"] <= run["max_ms"]
        assert run["reader_cpu_ms_per_request"] > 0
    table = format_serve_results(results)
    assert "reader CPU ms/req" in table and "targets:" in table
    client = redis.Redis.from_url(settings.redis_url)
    try:
        assert not list(client.scan_iter(match=f"{results['setup']['key_prefix']}:*", count=1000))
    finally:
        client.close()
