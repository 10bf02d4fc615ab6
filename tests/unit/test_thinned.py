"""The sparse sample of a ratings file: what is kept, and the file `freshrec eval` reads back."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from freshrec.evaluation.datasets import read_events
from freshrec.evaluation.thinned import main, thinned, write_csv


def _udata(path: Path, rows: int) -> Path:
    path.write_text(
        "".join(f"{n % 50}\t{n}\t{1 + n % 5}\t{86400 * 10_000 + 3_600 * n}\n" for n in range(rows))
    )
    return path


def test_a_share_of_the_ratings_is_kept_in_order_with_days_for_times(tmp_path: Path) -> None:
    source = list(read_events(_udata(tmp_path / "u.data", 20_000)))
    kept = list(thinned(source, 0.1, seed=3))
    assert 1_800 < len(kept) < 2_200  # 2,000 expected; the draw's sd is 42
    day_of = {e["item_id"]: int(e["ts"]) // 86400 for e in source}  # one rating per item
    assert all(day_of[item] == day for _, item, _, day in kept)
    days = [day for *_, day in kept]
    assert days == sorted(days)  # the file's order, which is time order here
    assert len({u for u, *_ in kept}) == 50  # every user keeps some events


def test_the_written_file_reads_back_as_the_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _udata(tmp_path / "u.data", 2_000)
    assert main([str(source), "--share", "0.5", "--seed", "9"]) == 0
    written = tmp_path / "sample.csv"
    written.write_text(capsys.readouterr().out)
    back = list(read_events(written))  # times in seconds, detected as such
    expected = list(thinned(read_events(source), 0.5, seed=9))
    assert [(e["user_id"], e["item_id"], e["value"], e["ts"] / 86400) for e in back] == expected
    assert all(e["type"] == "rating" for e in back)


def test_other_events_and_unreadable_lines_are_left_out() -> None:
    events = [
        {"type": "click", "user_id": "u", "item_id": "i", "ts": 0.0},
        {"__raw__": b"not an event"},
        {"type": "rating", "user_id": "u", "item_id": "j", "value": 3.5, "ts": 86400.0 * 2.5},
    ]
    assert list(thinned(events, 1.0, seed=0)) == [("u", "j", 3.5, 2)]
    out = io.StringIO()
    assert write_csv(thinned(events, 1.0, seed=0), out) == 1
    assert out.getvalue() == "user_id,item_id,rating,timestamp\nu,j,3.5,172800\n"
    with pytest.raises(ValueError, match="share"):
        list(thinned(events, 0.0, seed=0))
