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

SYSTEMS = ("freshrec", "popularity", "river_biased_mf")
LABELS = {"freshrec": "freshrec", "popularity": "popularity", "river_biased_mf": "river BiasedMF"}


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
        f"{summary['mode']}, chunks of {summary['chunk']}",
        f"{summary['events']:,} events ({summary['skipped']:,} skipped), "
        f"{summary['users']:,} users, {summary['items']:,} items; "
        f"{summary['rating_events']:,} ratings predicted, "
        f"{summary['topn_events']:,} top-N events",
        "",
        f"{'':16}" + "".join(f"{name:>18}" for name, _ in columns),
    ]
    for key, label in _ROWS:
        cells = "".join(f"{_cell(values.get(key)):>18}" for _, values in columns)
        lines.append(f"{label:16}{cells}")
    if summary.get("sequential"):
        seq = summary["sequential"]
        lines.append(
            f"\nper-event (no chunk staleness) RMSE {seq['rmse']:.4f}, MAE {seq['mae']:.4f}"
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
        f"\n{summary['events_per_s']:,.0f} events/s through freshrec (prediction included); "
        f"{summary['wall_s']:.1f} s in all"
    )
    if summary.get("report"):
        lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


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
        ("rmse.png", "rolling RMSE", evaluation.rating_positions, "sq_errors", True),
        ("hr10.png", "rolling HR@10", evaluation.topn_positions, "hits", False),
    )
    for name, title, positions, attribute, root in series:
        if not positions:
            continue
        x = np.asarray(positions)
        window = max(100, len(positions) // 50)
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        for system in SYSTEMS:
            parts = getattr(evaluation.scores[system], attribute)
            values = rolling_mean(np.concatenate(parts), window)
            ax.plot(x, np.sqrt(values) if root else values, label=LABELS[system])
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
        f"Mode `{summary['mode']}`, chunks of {summary['chunk']} events: every system predicts "
        "a chunk from its state before it, then learns it. "
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
            f"Per rating, with no chunk staleness (the updater's own prequential error): "
            f"RMSE {seq['rmse']:.4f}, MAE {seq['mae']:.4f}.",
            "",
        ]
    for name, title in plots:
        text += [f"![{title}]({name})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(text))
    return report
