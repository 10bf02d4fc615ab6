"""What ``freshrec eval`` prints and writes: the summary table, plots and a Markdown report."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from freshrec.evaluation.prequential import Evaluation

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from freshrec.evaluation.ranking_metrics import (
    COLD_BELOW,
    rolling_mean,
)

SYSTEMS = ("freshrec", "popularity", "item_knn", "river_biased_mf", "river_biased_mf_docs")
LABELS = {
    "freshrec": "freshrec",
    "popularity": "popularity",
    "item_knn": "item-kNN",
    "river_biased_mf": "river MF (ours)",
    "river_biased_mf_docs": "river MF (docs)",
}
FRESHNESS_ROWS = (("hr@10", "HR@10"), ("ndcg@10", "NDCG@10"), ("rmse", "RMSE"), ("mae", "MAE"))


# --- output --------------------------------------------------------------------------------------
_ROWS = (
    ("rmse", "RMSE"),
    ("rmse_last_quarter", "RMSE, last 25%"),
    ("mae", "MAE"),
    ("hr@10", "HR@10"),
    ("hr@20", "HR@20"),
    ("ndcg@10", "NDCG@10"),
    ("mrr", "MRR@20"),
    ("coverage", "coverage@10"),
    ("cold_hit_share", "cold-hit share"),
)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a short text table: freshrec and the baselines side by side."""
    columns = [("freshrec", summary)] + [
        (LABELS.get(name, name), summary["baselines"][name]) for name in summary["baselines"]
    ]
    lines = [
        f"prequential evaluation of {summary['file']} ({summary['format']}), mode "
        f"{summary['mode']}, {protocol_text(summary)}",
        f"{summary['events']:,} events ({summary['skipped']:,} skipped), "
        f"{summary['users']:,} users, {summary['items']:,} items; "
        f"{summary['rating_events']:,} ratings predicted, "
        f"{summary['topn_events']:,} top-N events",
        "",
        f"{'':16}" + "".join(f"{name:>16}" for name, _ in columns),
    ]
    for key, label in _ROWS:
        cells = "".join(f"{_cell(values.get(key)):>16}" for _, values in columns)
        lines.append(f"{label:16}{cells}")
    tau = summary.get("cf_recency")
    if tau is not None and math.isfinite(tau):
        lines.append(f"item-CF's recency scale learned from users' choices: tau = {tau:.2f} events")
    if summary.get("by_history"):
        lines += ["", "HR@10 / NDCG@10 by the user's interactions in the state when predicted:"]
        lines += history_table(summary["by_history"], markdown=False)
    if summary.get("freshness"):
        lines += [
            "",
            "the value of freshness (each event predicted from the events this much older):",
        ]
        lines += freshness_table(summary["freshness"], markdown=False)
        lines.append(f"({summary['freshness_s']:.1f} s for the table)")
    if summary.get("sequential"):
        seq = summary["sequential"]
        lines.append(
            f"\nper-event (no staleness at all) RMSE {seq['rmse']:.4f}, MAE {seq['mae']:.4f}"
        )
    if summary.get("recall_ablation"):
        lines.append(
            "\nrecall ablation (no exploration slots; *_only: the funnel's ranking over one "
            "channel's candidates; *_alone: one channel ranked by its own score):"
        )
        for name, values in summary["recall_ablation"].items():
            lines.append(
                f"  {name:16} HR@10 {_cell(values['hr@10'])}  NDCG@10 {_cell(values['ndcg@10'])}"
                f"  coverage {_cell(values['coverage'])}"
            )
    lines.append(
        f"\n{summary['events_per_s']:,.0f} events/s through freshrec (prediction included), "
        f"{summary['events'] / max(summary['wall_s'], 1e-9):,.0f} events/s in all "
        f"({summary['wall_s']:.1f} s, {summary['baselines_s']:.1f} s of it the baselines)"
    )
    if summary.get("report"):
        lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


def history_table(by_history: dict[str, dict[str, Any]], markdown: bool = True) -> list[str]:
    """``by_history`` as rows: a segment's targets, then every system's HR@10 / NDCG@10."""
    present = dict.fromkeys(name for row in by_history.values() for name in row)
    names = [name for name in SYSTEMS if name in present]  # the recall ablation's are left out
    labels = [LABELS[name] for name in names]
    if markdown:
        out = ["| interactions | targets | " + " | ".join(labels) + " |"]
        out.append("| --- | --- |" + " --- |" * len(names))
    else:
        out = [f"{'interactions':14}{'targets':>9}" + "".join(f"{n:>18}" for n in labels)]
    for label, row in by_history.items():
        cells = [
            f"{_cell(row[n]['hr@10'])} / {_cell(row[n]['ndcg@10'])}" if n in row else "-"
            for n in names
        ]
        if markdown:
            out.append(f"| {label} | {row['targets']:,} | " + " | ".join(cells) + " |")
        else:
            out.append(f"{label:14}{row['targets']:>9,}" + "".join(f"{c:>18}" for c in cells))
    return out


def protocol_text(summary: dict[str, Any]) -> str:
    """How the run's states were made, in words."""
    if summary.get("protocol") == "chunk":
        return f"chunks of {summary['chunk']} events"
    return f"lag {summary['lag_s']:g} s (every event predicted from the events that much older)"


def _lag_text(lag: float) -> str:
    for unit, seconds in (("day", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if lag >= seconds and lag % seconds == 0:
            return f"{lag / seconds:g} {unit}"
    return f"{lag:g} s"


def freshness_table(freshness: list[dict[str, Any]], markdown: bool = True) -> list[str]:
    """One row per system and metric, one column per lag: what each second of staleness costs."""
    lags = [_lag_text(entry["lag_s"]) for entry in freshness]
    systems = list(freshness[0]["systems"]) if freshness else []
    if markdown:
        out = ["| system | metric | " + " | ".join(lags) + " |"]
        out.append("| --- | --- |" + " --- |" * len(lags))
    else:
        out = [f"{'':18}{'':9}" + "".join(f"{lag:>10}" for lag in lags)]
    same = all("same_targets" in entry for entry in freshness)
    for system in systems:
        rows = [(key, label, "systems") for key, label in FRESHNESS_ROWS]
        if same:  # HR@10 and NDCG@10 again, over the targets every lag shares
            rows[2:2] = [(key, f"{label}*", "same_targets") for key, label in FRESHNESS_ROWS[:2]]
        for key, label, source in rows:
            values = [_systems(entry, source)[system].get(key) for entry in freshness]
            if all(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
                continue
            name = LABELS.get(system, system)
            if markdown:
                out.append(f"| {name} | {label} | " + " | ".join(_cell(v) for v in values) + " |")
            else:
                out.append(f"{name:18}{label:9}" + "".join(f"{_cell(v):>10}" for v in values))
    counts = [("top-N targets", "targets", [str(entry["topn_events"]) for entry in freshness])]
    if same:
        shared = [str(entry["same_targets"]["topn_events"]) for entry in freshness]
        counts.append(("* the targets every lag shares", "* shared", shared))
    for long, short, values in counts:
        if markdown:
            out.append(f"| | {long} | " + " | ".join(values) + " |")
        else:
            out.append(f"{'':18}{short:9}" + "".join(f"{t:>10}" for t in values))
    return out


def _systems(entry: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """A freshness entry's metrics per system: over its own targets or the shared ones."""
    return entry["systems"] if source == "systems" else entry[source]["systems"]


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}"


def write_report(out_dir: Path, summary: dict[str, Any], evaluation: Evaluation) -> Path:
    """``summary.json``, PNG plots of rolling RMSE and HR@10 over the stream, ``report.md``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots = []
    series = (
        ("rmse.png", "rolling RMSE", evaluation.rating_positions, "squared_errors", True),
        ("hr10.png", "rolling HR@10", evaluation.topn_positions, "hit_series", False),
    )
    for name, title, positions, attribute, root in series:
        if not positions:
            continue
        x = np.asarray(positions)
        window = max(100, len(positions) // 50)
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        for n, system in enumerate(SYSTEMS):
            series = getattr(evaluation.scores[system], attribute)()
            if series.size != x.size or not np.isfinite(series).any():
                continue  # a system without ratings (item-kNN) has no RMSE curve
            values = rolling_mean(series, window)
            y = np.sqrt(values) if root else values
            ax.plot(x, y, color=f"C{n}", label=LABELS[system])
        ax.set_xlabel("event (stream order)")
        ax.set_ylabel(title.split(" ", 1)[1])
        ax.set_title(f"{title} over the stream (window {window})")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        plots.append((name, title))
    names = [LABELS.get(b, b) for b in summary["baselines"]]
    rows = ["| metric | " + " | ".join(("freshrec", *names)) + " |"]
    rows.append("| --- " * (1 + 1 + len(summary["baselines"])) + "|")
    for key, label in _ROWS:
        cells = [_cell(summary.get(key))]
        cells += [_cell(summary["baselines"][b].get(key)) for b in summary["baselines"]]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    text = [
        f"# Prequential evaluation of `{Path(summary['file']).name}`",
        "",
        f"Mode `{summary['mode']}`, {protocol_text(summary)}: every system predicts each event "
        "from the same state, then learns the next batch. "
        f"{summary['events']:,} events ({summary['skipped']:,} skipped), "
        f"{summary['rating_events']:,} ratings predicted, {summary['topn_events']:,} top-N "
        f"events; {summary['events_per_s']:,.0f} events/s through freshrec.",
        "",
        *rows,
        "",
        "Ratings are clipped to the scale; MRR is truncated at the list's 20 items; ties count "
        "against the target; coverage is the distinct items in the top 10 of any list over the "
        f"distinct items of the stream; cold items had fewer than {COLD_BELOW} interactions "
        "before the event.",
        "",
    ]
    if summary.get("sequential"):
        seq = summary["sequential"]
        text += [
            f"Per rating, with no staleness at all (the updater's own prequential error): "
            f"RMSE {seq['rmse']:.4f}, MAE {seq['mae']:.4f}.",
            "",
        ]
    if summary.get("by_history"):
        text += [
            "## By the user's history",
            "",
            "HR@10 / NDCG@10 over the top-N targets of users with this many interactions in the "
            "state that predicted them.",
            "",
            *history_table(summary["by_history"]),
            "",
        ]
    if summary.get("freshness"):
        text += [
            "## The value of freshness",
            "",
            "The same stream and systems under the lag protocol at each lag: every event "
            "predicted from exactly the events at least that much older. A longer lag has fewer "
            "top-N targets (a user needs interactions in the state), and only returning users' "
            "among them; rows marked * score every lag on the targets all lags share, so they "
            "differ by the lag alone.",
            "",
            *freshness_table(summary["freshness"]),
            "",
        ]
        if _freshness_plot(out_dir, summary["freshness"]):
            text += ["![HR@10 and RMSE against lag](freshness.png)", ""]
        main_lag = summary.get("lag_s") if summary.get("protocol") == "lag" else None
        for entry in summary["freshness"]:
            if entry.get("by_history") and entry["lag_s"] != main_lag:  # shown above
                text += [
                    f"### By the user's history, lag {_lag_text(entry['lag_s'])}",
                    "",
                    *history_table(entry["by_history"]),
                    "",
                ]
    for name, title in plots:
        text += [f"![{title}]({name})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(text))
    return report


def _freshness_plot(out_dir: Path, freshness: list[dict[str, Any]]) -> bool:
    """``freshness.png``: HR@10 and RMSE of every system against the lag, log x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lags = [entry["lag_s"] for entry in freshness]
    if len(lags) < 2:
        return False
    same = all("same_targets" in entry for entry in freshness)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    for ax, (key, label) in zip(axes, (("hr@10", "HR@10"), ("rmse", "RMSE")), strict=True):
        for n, system in enumerate(freshness[0]["systems"]):
            values = [entry["systems"][system].get(key) for entry in freshness]
            if all(v is None for v in values):
                continue  # item-kNN predicts no ratings; each system keeps its colour
            y = [np.nan if v is None else v for v in values]
            ax.plot(lags, y, marker="o", color=f"C{n}", label=LABELS.get(system, system))
            if key == "hr@10" and same:
                shared = [_systems(e, "same_targets")[system].get(key) for e in freshness]
                y = [np.nan if v is None else v for v in shared]
                ax.plot(lags, y, marker=".", linestyle="--", color=f"C{n}")
        ax.set_xscale("log")
        ax.set_xticks(lags, [_lag_text(lag) for lag in lags])
        ax.set_xlabel("lag (log scale)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} against freshness")
        if key == "hr@10" and same:
            ax.text(0.01, 0.01, "dashed: the targets every lag shares", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "freshness.png")
    plt.close(fig)
    return True
