"""`freshrec data fetch`: MovieLens 100K from the package index, for real, read as eval reads it.

These need the package index (or a mirror pip is configured for). The dataset is fetched once
into the shared cache folder (``FRESHREC_HOME``) through ``ensure_dataset``; later runs only
check its checksum. One test downloads into a fresh folder to exercise the whole fetch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from freshrec.devenv import local_services
from freshrec.evaluation.datasets import detect_format, detect_ts_unit
from freshrec.evaluation.fetch import DATASETS, ensure_dataset
from freshrec.evaluation.prequential import load_events
from freshrec.settings import Settings
from tests.support import free_port

pytestmark = pytest.mark.integration

ML100K = DATASETS["ml-100k"]


def freshrec(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "freshrec.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def ml100k() -> Path:
    """MovieLens 100K in the shared cache folder, fetched by the first test run on the machine."""
    return ensure_dataset("ml-100k", Settings.from_env().home)


def test_fetch_into_a_fresh_home_then_only_check(tmp_path: Path) -> None:
    env = {"FRESHREC_HOME": str(tmp_path)}
    missing = freshrec("data", "path", "ml-100k", env=env)
    assert missing.returncode != 0
    assert "run `freshrec data fetch ml-100k`" in missing.stderr

    first = freshrec("data", "fetch", "ml-100k", "--json", env=env)
    assert first.returncode == 0, first.stderr
    fetched = json.loads(first.stdout)
    target = tmp_path / "data" / "ml-100k" / "ml-100k.inter"
    assert fetched["path"] == str(target)
    assert (fetched["rows"], fetched["sha256"]) == (100_000, ML100K.sha256)
    assert fetched["downloaded"] is True
    assert [p.name for p in target.parent.iterdir()] == ["ml-100k.inter"]  # nothing half-done
    print(f"fetch took {fetched['seconds']} s")

    again = freshrec("data", "fetch", "ml-100k", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["downloaded"] is False

    where = freshrec("data", "path", "ml-100k", env=env)
    assert (where.returncode, where.stdout.strip()) == (0, str(target))


def test_an_unreachable_index_is_a_clear_error(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/simple"
    env = {"FRESHREC_HOME": str(tmp_path), "PIP_INDEX_URL": closed, "PIP_FIND_LINKS": ""}
    done = freshrec("data", "fetch", "ml-100k", env=env, timeout=120)
    assert done.returncode == 2
    assert "could not download recbole 1.2.1 from the package index: " in done.stderr
    assert "Connection refused" in done.stderr
    assert not (tmp_path / "data" / "ml-100k" / "ml-100k.inter").exists()


def test_ml100k_reads_as_the_events_eval_takes(ml100k: Path) -> None:
    assert (detect_format(ml100k), detect_ts_unit(ml100k)) == ("recbole", "s")
    events, skipped, fmt = load_events(ml100k, Settings.from_env())
    assert (len(events), skipped, fmt) == (100_000, 0, "recbole")
    assert len({e.user_id for e in events}) == 943
    assert len({e.item_id for e in events}) == 1682
    assert {e.type for e in events} == {"rating"}
    assert {e.value for e in events} == {1.0, 2.0, 3.0, 4.0, 5.0}
    # September 1997 to April 1998, in unix seconds.
    assert 874_000_000 < events[0].ts <= events[-1].ts < 894_000_000


def test_eval_runs_on_ml100k(ml100k: Path, endpoints: local_services.Endpoints) -> None:
    settings = dataclasses.replace(
        Settings.from_env(),
        kafka_bootstrap=endpoints.kafka_bootstrap,
        redis_url=endpoints.redis_url,
    )
    command = ("eval", str(ml100k), "--mode", "direct", "--limit", "2000", "--json")
    done = freshrec(*command, env=settings.environ())
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["format"], summary["events"], summary["skipped"]) == ("recbole", 2000, 0)
    assert summary["rmse"] < 1.5
