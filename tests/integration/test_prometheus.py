"""The project's Prometheus configuration, alert rules and dashboards against a real Prometheus.

Prometheus is Debian's package (installed by `freshrec.devenv.prometheus` when missing, as
redis-server is), run with ``deploy/prometheus.yml`` itself pointed at a live worker and reader.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from freshrec.devenv.prometheus import (
    CONFIG,
    RULES,
    LocalPrometheus,
    binary,
    project_config,
)
from freshrec.settings import Settings
from freshrec.streams.producer import EventProducer
from tests.metrics_support import metered_worker
from tests.support import free_port, http_json, running_reader, wait_until

pytestmark = pytest.mark.integration

DASHBOARDS = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
METRIC = re.compile(r"\bfreshrec_[a-z0-9_]+")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=CONFIG.parent
    )


def test_promtool_accepts_the_configuration() -> None:
    checked = _promtool("check", "config", str(CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_promtool_accepts_the_alert_rules() -> None:
    checked = _promtool("check", "rules", str(RULES / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_fires_on_its_condition_and_is_silent_without() -> None:
    tested = _promtool("test", "rules", str(RULES / "alerts.test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    alerts = set(re.findall(r"- alert: (\w+)", (RULES / "alerts.yml").read_text()))
    cases = (RULES / "alerts.test.yml").read_text().split("\n  - name: ")[1:]
    named = [(case, set(re.findall(r"alertname: (\w+)", case))) for case in cases]
    fires = set().union(*(names for case, names in named if "exp_labels" in case))
    silent = set().union(*(names for case, names in named if "exp_alerts: []" in case))
    assert alerts and alerts == fires == silent, (alerts, fires, silent)


def _panels() -> list[tuple[str, str, str]]:
    """(dashboard, panel, PromQL) of every query of every dashboard."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                found.append((dashboard["title"], panel["title"], target["expr"]))
    return found


def _problems(prometheus: LocalPrometheus, queries: list[tuple[str, str, str]]) -> list[str]:
    """What is wrong with these panels now: a metric Prometheus has never seen, or no data."""
    known = set(prometheus.api("label/__name__/values"))
    problems = []
    for dashboard, panel, expr in queries:
        missing = set(METRIC.findall(expr)) - known
        if missing:
            problems.append(f"{dashboard} / {panel}: no such metric {sorted(missing)}")
        elif not prometheus.api("query", query=expr)["result"]:
            problems.append(f"{dashboard} / {panel}: no data for {expr}")
    return problems


class Traffic(threading.Thread):
    """Live events, requests and clicks on what was shown, until stopped: every panel's input."""

    def __init__(self, settings: Settings, reader: str) -> None:
        super().__init__(daemon=True)
        self.settings, self.reader = settings, reader
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _run(self) -> None:
        rng = random.Random(12)
        kinds = ("click", "view", "rating", "purchase", "view", "click")
        poison = Producer({"bootstrap.servers": self.settings.kafka_bootstrap, "log_level": 3})
        with EventProducer(self.settings.kafka_bootstrap, self.settings.events_topic, 50) as out:
            while not self.done.is_set():
                now = time.time()
                for _ in range(40):
                    kind = rng.choice(kinds)
                    event = {
                        "type": kind,
                        "user_id": f"u{rng.randrange(300)}",
                        "item_id": f"i{int(rng.paretovariate(1.2)) % 400}",
                        "ts": now,
                    }
                    if kind == "rating":
                        event["value"] = float(rng.randint(1, 5))
                    out.send(event)
                for _ in range(4):
                    user = f"u{rng.randrange(300)}"
                    status, body = http_json(f"{self.reader}/recommendations/{user}?k=10")
                    if status == 200 and body["items"]:
                        shown = body["items"][0]["item_id"]
                        out.send({"type": "click", "user_id": user, "item_id": shown, "ts": now})
                http_json(f"{self.reader}/similar/i1?k=5")
                poison.produce(self.settings.events_topic, key=b"p", value=b"{not json")
                out.flush()
                poison.poll(0)
                self.done.wait(0.1)
        poison.flush(10)


@pytest.fixture
def traffic_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, worker_metrics_port=free_port())


@pytest.fixture
def watched(traffic_settings: Settings, tmp_path: Path) -> Iterator[tuple[LocalPrometheus, str]]:
    """A worker and a reader under live traffic, scraped by Prometheus with the project's
    configuration: (Prometheus, the reader's base URL)."""
    settings = traffic_settings
    with (
        metered_worker(settings, tmp_path / "worker.log"),
        running_reader(settings, tmp_path / "reader.log") as (base, _),
    ):
        targets = {
            "freshrec-worker": f"127.0.0.1:{settings.worker_metrics_port}",
            "freshrec-reader": base.removeprefix("http://"),
        }
        config = project_config(targets, tmp_path / "prometheus")
        prometheus = LocalPrometheus(config, tmp_path / "prometheus")
        traffic = Traffic(settings, base)
        traffic.start()
        try:
            yield prometheus, base
        finally:
            traffic.done.set()
            traffic.join(30)
            prometheus.stop()
        assert traffic.error is None, traffic.error


def test_every_dashboard_panel_returns_data_from_a_live_run(
    watched: tuple[LocalPrometheus, str],
) -> None:
    prometheus, _ = watched
    queries = _panels()
    assert len(queries) > 20
    # The check itself catches a panel that names a metric nothing exports.
    bogus = [("test", "bogus", "sum(rate(freshrec_no_such_metric_total[1m]))")]
    last: list[list[str]] = [[]]

    def settled() -> bool:
        last[0] = _problems(prometheus, queries)
        return not last[0]

    try:
        wait_until(settled, 180, "every panel to return data", poll_s=2.0)
    except TimeoutError:
        pytest.fail("panels without data after 180 s:\n" + "\n".join(last[0]))
    assert _problems(prometheus, bogus), "a nonexistent metric went unnoticed"
    known = set(prometheus.api("label/__name__/values"))
    for path in DASHBOARDS.glob("*.json"):  # annotations mark events: no data is normal
        for annotation in json.loads(path.read_text())["annotations"]["list"]:
            missing = set(METRIC.findall(annotation["expr"])) - known
            assert not missing, (path.name, annotation["name"], missing)
            prometheus.api("query", query=annotation["expr"])  # valid PromQL

    targets = prometheus.api("targets")["activeTargets"]
    assert {t["labels"]["job"] for t in targets} == {"freshrec-worker", "freshrec-reader"}
    assert all(t["health"] == "up" for t in targets), targets

    def evaluated() -> list[dict]:
        """The rules once each has been evaluated (health "unknown" until its group's turn)."""
        rules = [r for g in prometheus.api("rules")["groups"] for r in g["rules"]]
        return rules if all(r["health"] != "unknown" for r in rules) else []

    rules = wait_until(evaluated, 60, "every alert rule to be evaluated", poll_s=1.0)
    alerts = set(re.findall(r"- alert: (\w+)", (RULES / "alerts.yml").read_text()))
    assert {r["name"] for r in rules if r["type"] == "alerting"} == alerts
    assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]


def test_dashboards_render_draws_every_dashboard_from_a_live_run(
    watched: tuple[LocalPrometheus, str], tmp_path: Path
) -> None:
    prometheus, _ = watched
    wait_until(
        lambda: not _problems(prometheus, _panels()), 180, "every panel to return data", poll_s=2
    )
    out = tmp_path / "png"
    rendered = subprocess.run(
        [sys.executable, "-m", "freshrec.cli", "dashboards", "render", "--json",
         "--prometheus", prometheus.url, "--out", str(out), "--minutes", "5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    written = json.loads(rendered.stdout)["dashboards"]
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS.glob("*.json")}
    assert {w["dashboard"] for w in written} == titles
    for dashboard in written:
        png = Path(dashboard["png"])
        assert png.parent == out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", dashboard
        assert dashboard["panels_without_data"] == 0, dashboard
