"""`freshrec dashboards render`: the Grafana dashboards as PNGs, without Grafana.

Reads the dashboards' JSON (``deploy/grafana/dashboards``, what Grafana provisions), asks a
Prometheus for every query of every panel over a time range (``/api/v1/query_range``), and
draws each dashboard as one figure, its panels on a grid in the dashboard's order, one line per
series, labelled by the panel's legend format. For a README, a report, or a machine without
Grafana.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards"
UNITS = {"s": "seconds", "ops": "per second", "reqps": "requests/s", "bytes": "bytes"}
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass(frozen=True)
class Series:
    """One line of a panel: its legend and its points (unix seconds, value)."""

    legend: str
    times: list[float]
    values: list[float]


class PrometheusClient:
    """The two calls the renderer needs of Prometheus's HTTP API."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Any]:
        """The matrix of ``expr`` over [start, end]; raises with Prometheus's own error."""
        params = {"query": expr, "start": start, "end": end, "step": step}
        url = f"{self.url}/api/v1/query_range?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeError(
                f"Prometheus at {self.url} does not answer ({exc}); pass --prometheus URL"
            ) from None
        if body.get("status") != "success":
            raise ValueError(f"Prometheus refused {expr!r}: {body.get('error', body)}")
        return body["data"]["result"]


def load_dashboards(directory: Path = DASHBOARDS) -> list[dict[str, Any]]:
    """Every dashboard JSON in ``directory``, by file name."""
    paths = sorted(directory.glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"no dashboard JSON in {directory}")
    return [json.loads(path.read_text()) for path in paths]


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's legend format: ``{{label}}`` replaced by the series' value of it.

    >>> legend("{{route}} p99", {"route": "/healthz"})
    '/healthz p99'
    >>> legend("", {"__name__": "up", "job": "reader"})
    '{job="reader"}'
    """
    if template:
        return _LEGEND.sub(lambda m: labels.get(m.group(1), ""), template)
    shown = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return "{" + shown + "}"


def panel_series(
    client: PrometheusClient, panel: dict[str, Any], start: float, end: float, step: float
) -> list[Series]:
    """Every series of every query of a panel over the range."""
    found = []
    for target in panel.get("targets", []):
        for result in client.query_range(target["expr"], start, end, step):
            points = [(float(t), float(v)) for t, v in result["values"]]
            found.append(
                Series(
                    legend(target.get("legendFormat", ""), result["metric"]),
                    [t for t, _ in points],
                    [v for _, v in points],
                )
            )
    return found


def render_dashboard(
    dashboard: dict[str, Any],
    client: PrometheusClient,
    out: Path,
    start: float,
    end: float,
    step: float,
) -> tuple[Path, int]:
    """One PNG of a dashboard; returns its path and how many of its panels had no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    panels = dashboard["panels"]
    columns = 2
    rows = max(1, math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(14, 3.2 * rows), squeeze=False)
    figure.suptitle(dashboard["title"], fontsize=14, fontweight="bold")
    empty = 0
    for n, axis in enumerate(axes.flat):
        if n >= len(panels):
            axis.set_visible(False)
            continue
        panel = panels[n]
        axis.set_title(panel["title"], fontsize=10, loc="left")
        series = panel_series(client, panel, start, end, step)
        drawn = 0
        for line in series:
            pairs = zip(line.times, line.values, strict=True)
            finite = [(t, v) for t, v in pairs if math.isfinite(v)]
            if not finite:
                continue
            times = [datetime.fromtimestamp(t, tz=UTC) for t, _ in finite]
            axis.plot(times, [v for _, v in finite], label=line.legend, linewidth=1.2)
            drawn += 1
        if not drawn:
            empty += 1
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        if unit == "percentunit":
            axis.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        elif unit in UNITS:
            axis.set_ylabel(UNITS[unit], fontsize=8)
        axis.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=UTC))
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
        if 0 < drawn <= 12:
            axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{dashboard['uid'].removeprefix('freshrec-')}.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path, empty


def render_all(
    prometheus_url: str,
    out: Path,
    minutes: float = 30.0,
    directory: Path = DASHBOARDS,
    end: float | None = None,
) -> list[dict[str, Any]]:
    """Render every dashboard over the last ``minutes``; one summary per PNG written."""
    client = PrometheusClient(prometheus_url)
    end = time.time() if end is None else end
    start = end - 60.0 * minutes
    step = max(1.0, (end - start) / 300)  # about 300 points a line
    written = []
    for dashboard in load_dashboards(directory):
        path, empty = render_dashboard(dashboard, client, out, start, end, step)
        written.append(
            {
                "dashboard": dashboard["title"],
                "png": str(path),
                "panels": len(dashboard["panels"]),
                "panels_without_data": empty,
            }
        )
    return written
