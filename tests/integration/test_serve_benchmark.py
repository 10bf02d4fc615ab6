"""``freshrec bench serve`` on a tiny state: every figure is reported, nothing is left behind.

No latency is asserted (a shared machine); only that the load generator's requests all reached
a real reader and were answered, and that the run cleans up after itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import redis

from freshrec.bench.mf_search import CELL_SHARES
from freshrec.bench.serve import format_serve_results, run_serve_bench
from freshrec.devenv import local_services
from freshrec.settings import Settings

pytestmark = pytest.mark.integration


def _on(endpoints: local_services.Endpoints) -> Settings:
    return dataclasses.replace(
        Settings.from_env(),
        kafka_bootstrap=endpoints.kafka_bootstrap,
        redis_url=endpoints.redis_url,
    )


def test_bench_serve_answers_every_request_and_leaves_no_keys(
    endpoints: local_services.Endpoints,
) -> None:
    settings = _on(endpoints)
    results = run_serve_bench(
        settings,
        items=2000,
        users=500,
        rates=(40.0, 80.0),
        seconds=1.0,
        show_progress=False,
        search_queries=50,
        warm_requests=100,
    )
    assert [r["target_rps"] for r in results["runs"]] == [40.0, 80.0]
    for run in results["runs"]:
        assert run["requests"] == int(run["target_rps"]) and run["errors"] == 0
        assert 0 < run["p50_ms"] <= run["p90_ms"] <= run["p99_ms"] <= run["max_ms"]
        assert run["reader_cpu_ms_per_request"] > 0 and run["client_cpu_ms_per_request"] > 0
        assert 0 < run["machine_busy"] <= 1  # a reader and a load generator were working
    table = format_serve_results(results)
    assert "reader CPU ms/req" in table and "targets:" in table and "machine busy" in table
    assert results["warm_up"]["requests"] == 100 and "warm-up" in table
    client = redis.Redis.from_url(settings.redis_url)
    try:
        assert not list(client.scan_iter(match=f"{results['setup']['key_prefix']}:*", count=1000))
    finally:
        client.close()


def test_bench_serve_on_factors_learned_from_a_ratings_file(
    endpoints: local_services.Endpoints, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    ratings = tmp_path / "u.data"  # MovieLens u.data: user, item, rating, time
    ratings.write_text(
        "".join(
            f"{rng.integers(60)}\t{rng.integers(80)}\t{rng.integers(1, 6)}\t{880000000 + n}\n"
            for n in range(1500)
        )
    )
    settings = _on(endpoints)
    results = run_serve_bench(
        settings,
        items=2500,
        users=300,
        rates=(40.0,),
        seconds=1.0,
        show_progress=False,
        factors_from=str(ratings),
        search_queries=40,
        warm_requests=0,
    )
    learned = results["factors_from"]
    assert learned["events"] == 1500 and 0 < learned["learned_items"] <= 80
    assert 0 < learned["learned_users"] <= 60
    (run,) = results["runs"]
    assert run["requests"] == 40 and run["errors"] == 0
    assert 0 < results["mf_share_read"] <= 1.0
    searches = results["search"]["searches"]
    assert searches["exact"]["recall"] == searches["flat"]["recall"] == 1.0
    assert searches["exact"]["served_overlap"] == 1.0
    for share in CELL_SHARES:  # what users see with an approximate MF recall, against exact
        assert 0.0 < searches[f"cells read={share:.0%}"]["served_overlap"] <= 1.0
    assert "factors learned from" in format_serve_results(results)


def test_bench_serve_spreads_requests_over_readers_sharing_the_port(
    endpoints: local_services.Endpoints,
) -> None:
    results = run_serve_bench(
        _on(endpoints),
        items=1500,
        users=300,
        rates=(60.0,),
        seconds=1.0,
        show_progress=False,
        search_queries=0,
        warm_requests=200,
        readers=2,
    )
    (run,) = results["runs"]
    assert run["requests"] == 60 and run["errors"] == 0
    assert run["reader_cpu_ms_per_request"] > 0
    served = results["requests_per_reader"]
    assert len(served) == 2 and all(n > 0 for n in served), served
    assert sum(served) >= 60 + 200
    assert "2 readers on one port" in format_serve_results(results)
