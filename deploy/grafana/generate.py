"""Writes freshrec's Grafana dashboards as plain JSON: ``python deploy/grafana/generate.py``.

Plain JSON from a short script rather than Grafana's foundation SDK: the dashboards are a few
dozen panels of one or two PromQL queries each, the script needs nothing beyond the standard
library, and the JSON it writes is what Grafana provisions, what `freshrec dashboards render`
reads and what the tests evaluate against a real Prometheus, all three the same file. A test
checks that the committed files are what this script writes.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
RATE = "1m"  # rates: four scrapes at the 15 s default, twelve at the project's 5 s
RATIO = "5m"  # ratios of rates: smoother


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"


@dataclass(frozen=True)
class Annotation:
    """Events drawn over every panel: a query whose samples mark when something happened."""

    name: str
    expr: str
    title: str
    color: str = "red"


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)
    annotations: tuple[Annotation, ...] = ()


def quantiles(metric: str, by: str = "", window: str = RATE) -> tuple[Query, ...]:
    """p50 and p99 of a histogram, optionally per label."""
    labels = f"le, {by}" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({labels}) (rate({metric}_bucket[{window}])))",
            f"{legend}p{round(q * 100)}",
        )
        for q in (0.5, 0.99)
    )


PIPELINE = Dashboard(
    "freshrec-pipeline",
    "freshrec / Pipeline",
    "Kafka to Redis: throughput, consumer lag, batch latency, dead letters, freshness.",
    (
        Panel(
            "Events learned per second, by type",
            (Query(f"sum by (type) (rate(freshrec_events_total[{RATE}]))", "{{type}}"),),
            "ops",
        ),
        Panel(
            "Consumer lag, by topic and partition",
            (
                Query(
                    "sum by (topic, partition) (freshrec_consumer_lag_messages)",
                    "{{topic}}/{{partition}}",
                ),
            ),
            "short",
            "High-water mark minus the next offset to process, as each worker sees its own.",
        ),
        Panel(
            "Batch apply latency",
            quantiles("freshrec_batch_apply_seconds"),
            "s",
            "One read script, the learning in memory, one write script.",
        ),
        Panel(
            "Freshness: event in Kafka to state in Redis",
            quantiles("freshrec_event_to_state_seconds"),
            "s",
        ),
        Panel(
            "Freshness: event in Kafka to list published",
            quantiles("freshrec_event_to_published_seconds"),
            "s",
            "From a user's oldest unpublished event reaching Kafka to their list on the topic "
            "(the publisher's debounce included).",
        ),
        Panel(
            "Dead letters per second, by source and reason class",
            (
                Query(
                    f"sum by (source, reason) (rate(freshrec_dead_letters_total[{RATE}]))",
                    "{{source}} {{reason}}",
                ),
            ),
            "ops",
        ),
        Panel(
            "Batches per second; redelivered and duplicate events skipped",
            (
                Query(f"sum(rate(freshrec_batches_total[{RATE}]))", "batches"),
                Query(f"sum(rate(freshrec_redelivered_events_total[{RATE}]))", "redelivered"),
                Query(f"sum(rate(freshrec_duplicate_events_total[{RATE}]))", "duplicates"),
            ),
            "ops",
        ),
        Panel(
            "Redis retries per second, by error",
            (
                Query(
                    f"sum by (error) (rate(freshrec_worker_redis_retries_total[{RATE}]))",
                    "{{error}}",
                ),
                Query("max(freshrec_worker_blocked)", "blocked"),
            ),
            "short",
        ),
        Panel(
            "Redis memory",
            (
                Query("max(freshrec_redis_memory_used_bytes)", "used"),
                Query("max(freshrec_redis_memory_max_bytes)", "maxmemory (0: none)"),
            ),
            "bytes",
        ),
        Panel(
            "Lists published per second",
            (Query(f"sum(rate(freshrec_recommendations_published_total[{RATE}]))", "published"),),
            "ops",
        ),
    ),
)

QUALITY = Dashboard(
    "freshrec-model-quality",
    "freshrec / Model quality and drift",
    "Prequential rating error, the hit rate of served lists, CTR per variant, and the drift "
    "detectors (their firings also mark every panel).",
    (
        Panel(
            "Rolling rating MAE (predicted before learned)",
            (
                Query(
                    f"sum(rate(freshrec_prequential_rating_abs_error_sum[{RATIO}])) / "
                    f"sum(rate(freshrec_prequential_rating_abs_error_count[{RATIO}]))",
                    "MAE",
                ),
            ),
            "short",
        ),
        Panel(
            "Rating error quantiles",
            quantiles("freshrec_prequential_rating_abs_error", window=RATIO),
            "short",
        ),
        Panel(
            "Hit rate: clicks on an item the user was shown",
            (
                Query(
                    f"sum(rate(freshrec_variant_clicks_total[{RATIO}])) / "
                    f'sum(rate(freshrec_events_total{{type="click"}}[{RATIO}]))',
                    "hit rate",
                ),
            ),
            "percentunit",
            "Share of clicks attributed to an earlier impression of that item to that user.",
        ),
        Panel(
            "CTR per variant",
            (
                Query(
                    f"sum by (variant) (rate(freshrec_variant_clicks_total[{RATIO}])) / "
                    f"sum by (variant) (rate(freshrec_variant_impressions_total[{RATIO}]))",
                    "{{variant}}",
                ),
                Query(
                    f"sum(rate(freshrec_variant_clicks_total[{RATIO}])) / "
                    f"sum(rate(freshrec_variant_impressions_total[{RATIO}]))",
                    "overall",
                ),
            ),
            "percentunit",
        ),
        Panel(
            "Impressions and lists served per second, by variant",
            (
                Query(
                    f"sum by (variant) (rate(freshrec_variant_impressions_total[{RATE}]))",
                    "impressions {{variant}}",
                ),
                Query(
                    f"sum by (variant) (rate(freshrec_variant_served_total[{RATE}]))",
                    "lists {{variant}}",
                ),
            ),
            "ops",
        ),
        Panel(
            "Recall's hit rate on users' choices",
            (
                Query(
                    f'sum(rate(freshrec_choices_total{{recalled="yes"}}[{RATIO}])) / '
                    f"sum(rate(freshrec_choices_total[{RATIO}]))",
                    "held by the ranked candidates",
                ),
            ),
            "percentunit",
            "Share of the items users interacted with after being served a list that were among "
            "the candidates the funnel ranked for them: recall's ceiling on real choices.",
        ),
        Panel(
            "Item-CF recency scale (learned)",
            (Query("max by (instance) (freshrec_cf_recency_events)", "{{instance}}"),),
            "short",
            "tau in events: a seed a events back in a user's history weighs exp(-a / tau). "
            "Learned from users' choices; a fall means tastes now change faster.",
        ),
        Panel(
            "Drift detector firings (per 5 min), by signal and detector",
            (
                Query(
                    "sum by (signal, detector) "
                    f"(increase(freshrec_drift_detections_total[{RATIO}]))",
                    "{{signal}} {{detector}}",
                ),
            ),
            "short",
            "ADWIN and Page-Hinkley over the rating error and the item and user divergences.",
        ),
        Panel(
            "Drift signals: mean of the latest 100 values",
            (Query("max by (signal) (freshrec_drift_signal_mean)", "{{signal}}"),),
            "short",
        ),
    ),
    (
        Annotation(
            "Drift detected",
            "sum by (signal, detector) (increase(freshrec_drift_detections_total[1m])) > 0",
            "drift: {{signal}} ({{detector}})",
        ),
    ),
)

SERVING = Dashboard(
    "freshrec-serving",
    "freshrec / Serving",
    "The reader: request rate, latency per route and per funnel stage, errors, snapshot age.",
    (
        Panel(
            "Requests per second, by route and status",
            (
                Query(
                    f"sum by (route, status) (rate(freshrec_http_requests_total[{RATE}]))",
                    "{{route}} {{status}}",
                ),
            ),
            "reqps",
        ),
        Panel(
            "Latency per route",
            quantiles("freshrec_http_request_seconds", "route"),
            "s",
        ),
        Panel(
            "Funnel stage latency (p99)",
            (
                Query(
                    "histogram_quantile(0.99, sum by (le, stage) "
                    f"(rate(freshrec_funnel_stage_seconds_bucket[{RATE}])))",
                    "{{stage}}",
                ),
            ),
            "s",
        ),
        Panel(
            "Server errors (5xx) share",
            (
                Query(
                    f'(sum(rate(freshrec_http_requests_total{{status=~"5.."}}[{RATIO}])) '
                    "or vector(0)) / "
                    f"sum(rate(freshrec_http_requests_total[{RATIO}]))",
                    "5xx",
                ),
            ),
            "percentunit",
        ),
        Panel(
            "Item snapshot age",
            (Query("max(freshrec_reader_snapshot_age_seconds)", "oldest reader"),),
            "s",
            "Time since a reader's in-memory item snapshot caught up with Redis.",
        ),
        Panel(
            "Background loop restarts and impressions dropped",
            (
                Query(
                    f"sum(increase(freshrec_reader_loop_restarts_total[{RATIO}])) or vector(0)",
                    "loop restarts",
                ),
                Query(
                    f"sum(increase(freshrec_impressions_dropped_total[{RATIO}]))",
                    "impressions dropped",
                ),
            ),
            "short",
        ),
    ),
)

CATALOGUE = Dashboard(
    "freshrec-catalogue",
    "freshrec / Catalogue",
    "What is shown of the catalogue: coverage, cold items' exposure, concentration.",
    (
        Panel(
            "Items in the catalogue",
            (Query("max(freshrec_catalogue_items)", "items"),),
            "short",
        ),
        Panel(
            "Coverage: distinct items shown in 5-10 min over the catalogue",
            (Query("avg(freshrec_catalogue_coverage_ratio)", "coverage"),),
            "percentunit",
        ),
        Panel(
            "Exposure share of cold items",
            (
                Query(
                    f"sum(rate(freshrec_served_cold_items_total[{RATIO}])) / "
                    f"sum(rate(freshrec_served_items_total[{RATIO}]))",
                    "cold share",
                ),
            ),
            "percentunit",
            "Items shown from the pool of new items or in an exploration slot.",
        ),
        Panel(
            "Popularity concentration: Gini of exposure",
            (Query("avg(freshrec_exposure_gini)", "Gini"),),
            "short",
            "0: every item shown equally often; towards 1: a few items get everything.",
        ),
        Panel(
            "Share of the catalogue MF recall reads",
            quantiles("freshrec_mf_recall_share_read", window=RATIO),
            "percentunit",
        ),
    ),
)

DASHBOARDS = (PIPELINE, QUALITY, SERVING, CATALOGUE)


def to_grafana(dashboard: Dashboard) -> dict[str, object]:
    """Grafana's dashboard JSON: two panels a row, each query a target."""
    panels = []
    for n, panel in enumerate(dashboard.panels):
        panels.append(
            {
                "id": n + 1,
                "type": panel.kind,
                "title": panel.title,
                "description": panel.description,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (n % 2), "y": 8 * (n // 2)},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {
                        "refId": chr(ord("A") + i),
                        "datasource": DATASOURCE,
                        "expr": query.expr,
                        "legendFormat": query.legend,
                    }
                    for i, query in enumerate(panel.queries)
                ],
            }
        )
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["freshrec"],
        "timezone": "utc",
        "editable": False,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": []},
        "annotations": {
            "list": [
                {
                    "name": a.name,
                    "datasource": DATASOURCE,
                    "enable": True,
                    "iconColor": a.color,
                    "expr": a.expr,
                    "step": "30s",
                    "titleFormat": a.title,
                    "useValueForTime": False,
                }
                for a in dashboard.annotations
            ]
        },
        "panels": panels,
    }


def render_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"{d.uid.removeprefix('freshrec-')}.json": json.dumps(to_grafana(d), indent=2) + "\n"
        for d in DASHBOARDS
    }


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (OUT / name).write_text(text)
        print(OUT / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
