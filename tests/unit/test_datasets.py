"""Reading ratings files of every contract format into events, and fetching datasets."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import sys
from pathlib import Path

import pytest

from freshrec import cli
from freshrec.evaluation.datasets import (
    RAW_KEY,
    TS_SAMPLE,
    TS_UNITS,
    assume_ts_unit,
    count_lines,
    detect_format,
    detect_ts_unit,
    read_events,
)
from freshrec.evaluation.fetch import (
    DATASETS,
    DatasetSpec,
    dataset_path,
    fetch_dataset,
    find_dataset,
)


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode())
    return path


def test_udata_lines_become_rating_events(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3.5\t891717742\n")
    events = list(read_events(path))
    assert events == [
        {
            "event_id": "u.data:1",
            "type": "rating",
            "user_id": "196",
            "item_id": "242",
            "value": 3.0,
            "ts": 881250949.0,
        },
        {
            "event_id": "u.data:2",
            "type": "rating",
            "user_id": "186",
            "item_id": "302",
            "value": 3.5,
            "ts": 891717742.0,
        },
    ]


def test_dat_lines_become_rating_events(tmp_path: Path) -> None:
    path = write(tmp_path / "ratings.dat", "1::1193::5::978300760\n")
    [event] = read_events(path)
    assert event == {
        "event_id": "ratings.dat:1",
        "type": "rating",
        "user_id": "1",
        "item_id": "1193",
        "value": 5.0,
        "ts": 978300760.0,
    }


@pytest.mark.parametrize(
    ("first_line", "expected"),
    [
        ("196\t242\t3\t881250949", "movielens-udata"),
        ("1::1193::5::978300760", "movielens-dat"),
        ("user_id,item_id,rating,timestamp", "csv"),
        ("userId,movieId,rating,timestamp", "csv"),
        ("user_id,item_id,type,value,ts", "csv"),
        ("user_id:token\titem_id:token\trating:float\ttimestamp:float", "recbole"),
        ("item_id:token\tuser_id:token", "recbole"),
        ('{"type": "click", "user_id": "u1", "item_id": "i1", "ts": 1.0}', "jsonl"),
        ('[{"type": "click", "user_id": "u1", "item_id": "i1", "ts": 1.0}]', "jsonl"),
    ],
)
def test_format_is_detected_from_first_line(tmp_path: Path, first_line: str, expected: str) -> None:
    path = write(tmp_path / "data.txt", f"\n{first_line}\nthis line is never looked at\n")
    assert detect_format(path) == expected


def test_undetectable_format_names_the_file_and_the_expected_formats(tmp_path: Path) -> None:
    path = write(tmp_path / "mystery.txt", "hello world\n")
    with pytest.raises(ValueError, match=r"mystery\.txt.*expected MovieLens u\.data"):
        detect_format(path)


def test_empty_file_is_an_error_not_an_empty_stream(tmp_path: Path) -> None:
    path = write(tmp_path / "empty.csv", "\n\n")
    with pytest.raises(ValueError, match=r"empty\.csv.*no non-empty line"):
        list(read_events(path))


def test_unknown_format_name_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t2\t3\t4\n")
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        read_events(path, fmt="parquet")


def test_given_format_overrides_detection(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t2\t3\t4\n")
    assert list(read_events(path, fmt="jsonl")) == [{RAW_KEY: b"1\t2\t3\t4"}]


def test_csv_ratings_become_rating_events(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user_id,item_id,rating,timestamp\n7,42,4.5,1700000000\n")
    assert list(read_events(path)) == [
        {
            "event_id": "r.csv:2",
            "type": "rating",
            "user_id": "7",
            "item_id": "42",
            "value": 4.5,
            "ts": 1700000000.0,
        }
    ]


def test_csv_with_type_column_keeps_the_type(tmp_path: Path) -> None:
    text = "ts,type,user_id,item_id,value\n1700000000,purchase,u1,i9,\n1700000001,view,u1,i8,2\n"
    events = list(read_events(write(tmp_path / "e.csv", text)))
    assert [(e["type"], e.get("value"), e["ts"]) for e in events] == [
        ("purchase", None, 1700000000.0),
        ("view", 2.0, 1700000001.0),
    ]


def test_csv_iso_timestamps_are_unix_seconds(tmp_path: Path) -> None:
    text = "user_id,item_id,timestamp\nu1,i1,2023-11-14T22:13:20Z\nu1,i2,2023-11-14T22:13:21\n"
    events = list(read_events(write(tmp_path / "t.csv", text)))
    assert [e["ts"] for e in events] == [1700000000.0, 1700000001.0]


def test_csv_without_rating_or_type_is_implicit_click(tmp_path: Path) -> None:
    [event] = read_events(write(tmp_path / "pairs.csv", "user_id,item_id\nu1,i1\n"))
    # An implicit signal, and no invented value or time: validation decides about those.
    assert event == {"event_id": "pairs.csv:2", "type": "click", "user_id": "u1", "item_id": "i1"}


def test_malformed_rating_line_is_kept_as_raw_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t2\t3\t100\n1\t2\tfive\t100\n1\t3\t4\t101\n")
    events = list(read_events(path, fmt="movielens-udata"))
    assert events[1] == {RAW_KEY: b"1\t2\tfive\t100"}
    assert [e["event_id"] for e in (events[0], events[2])] == ["u.data:1", "u.data:3"]


def test_jsonl_objects_pass_through_unchanged(tmp_path: Path) -> None:
    objects = [
        {"event_id": "a", "type": "click", "user_id": "u1", "item_id": "i1", "ts": 1.5},
        {"type": "teleport", "extra": [1, 2]},  # invalid, but judging it is not our job
    ]
    path = write(tmp_path / "e.jsonl", "".join(json.dumps(o) + "\n" for o in objects))
    assert list(read_events(path)) == objects


def test_jsonl_array_line_yields_each_event(tmp_path: Path) -> None:
    batch = [{"type": "view", "user_id": "u1", "item_id": f"i{k}", "ts": 1.0} for k in range(3)]
    path = write(tmp_path / "b.jsonl", json.dumps(batch) + "\n")
    assert list(read_events(path)) == batch


def test_non_json_line_is_kept_as_raw_bytes(tmp_path: Path) -> None:
    good = {"type": "click", "user_id": "u1", "item_id": "i1", "ts": 1.0}
    path = tmp_path / "e.jsonl"
    path.write_bytes(json.dumps(good).encode() + b"\r\n{not json\n\xff\xfe\n")
    assert list(read_events(path)) == [good, {RAW_KEY: b"{not json"}, {RAW_KEY: b"\xff\xfe"}]


def test_json_scalar_line_is_kept_as_raw_bytes(tmp_path: Path) -> None:
    path = write(tmp_path / "e.jsonl", '{"type": "click"}\n42\n')
    assert list(read_events(path))[1] == {RAW_KEY: b"42"}


def test_gzip_files_are_read(tmp_path: Path) -> None:
    path = tmp_path / "u.data.gz"
    with gzip.open(path, "wt") as out:
        out.write("196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    assert detect_format(path) == "movielens-udata"
    events = list(read_events(path))
    assert [e["event_id"] for e in events] == ["u.data:1", "u.data:2"]  # same ids as unpacked
    assert count_lines(path) == 2


def test_reading_is_lazy(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t2\t3\t4\n" * 10)
    stream = read_events(path)
    assert next(stream)["event_id"] == "u.data:1"
    stream.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "lines"),
    [("", 0), ("a\n", 1), ("a\nb", 2), ("a\nb\n", 2), ("a\n\n\n", 3)],
)
def test_count_lines_counts_physical_lines(tmp_path: Path, text: str, lines: int) -> None:
    assert count_lines(write(tmp_path / "f", text)) == lines


def test_count_lines_crosses_block_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * 100 + b"\n" + (b"0123456789" * 50_000 + b"\n") * 5)
    assert count_lines(path) == 6


# --- RecBole atomic files ------------------------------------------------------------------------

RECBOLE_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def test_recbole_inter_rows_become_rating_events(tmp_path: Path) -> None:
    path = write(tmp_path / "ml-100k.inter", RECBOLE_HEADER + "196\t242\t3\t881250949\n")
    assert list(read_events(path)) == [
        {
            "event_id": "ml-100k.inter:2",
            "type": "rating",
            "user_id": "196",
            "item_id": "242",
            "value": 3.0,
            "ts": 881250949.0,
        }
    ]


def test_recbole_columns_are_found_by_name_in_any_order(tmp_path: Path) -> None:
    text = 'timestamp:float\titem_id:token\tuser_id:token\treview:token_seq\n5\ti"9\tu1\ta b\n'
    [event] = read_events(write(tmp_path / "x.inter", text))
    # No rating column: implicit feedback. No quoting either: a quote belongs to the token.
    assert event == {
        "event_id": "x.inter:2",
        "type": "click",
        "user_id": "u1",
        "item_id": 'i"9',
        "ts": 5.0,
    }


def test_recbole_short_or_unparsable_rows_are_kept_as_raw_bytes(tmp_path: Path) -> None:
    text = RECBOLE_HEADER + "1\t2\n1\t2\tfive\t100\n1\t3\t4\t101\n"
    events = list(read_events(write(tmp_path / "r.inter", text)))
    assert events[:2] == [{RAW_KEY: b"1\t2"}, {RAW_KEY: b"1\t2\tfive\t100"}]
    assert events[2]["event_id"] == "r.inter:4"


@pytest.mark.parametrize(
    "header",
    [
        "user_id:token\titem_id:tokenz",  # not a RecBole field type
        "user_id:token\titem_id",  # a column without a type
        "user_id:token\tbasket:token",  # no item column
    ],
)
def test_near_recbole_headers_are_not_taken_for_one(tmp_path: Path, header: str) -> None:
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(write(tmp_path / "bad.inter", header + "\n1\t2\n"))


# --- day-resolution files ------------------------------------------------------------------------


def test_csv_date_column_is_utc_midnight(tmp_path: Path) -> None:
    text = "user_id,item_id,rating,date\n6,1488844,3,2005-09-06\n6,1488844,3,2005-09-07\n"
    events = list(read_events(write(tmp_path / "netflix.csv", text)))
    assert [e["ts"] for e in events] == [1125964800.0, 1125964800.0 + 86400]


def test_whole_day_numbers_are_read_as_days_when_named(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "user_id,item_id,rating,timestamp\nu,i,4,13032\n")
    assert detect_ts_unit(path) == "s"  # days are never guessed
    [event] = read_events(path, ts_unit="day")
    assert event["ts"] == 13032 * 86400.0 == 1125964800.0


def test_dates_ignore_the_unit_given_for_numbers(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "user_id,item_id,date\nu,i,2005-09-06\nu,j,13033\n")
    assert [e["ts"] for e in read_events(path, ts_unit="day")] == [1125964800.0, 1126051200.0]


# --- timestamp units -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stamp", "unit"),
    [
        ("881250949", "s"),
        ("100", "s"),  # a small synthetic clock stays in seconds
        ("99999999999", "s"),  # just under 1e11: the year 5138 in seconds
        ("100000000000", "ms"),  # 1e11 ms is March 1973
        ("1700000000123", "ms"),
        ("1700000000123456", "us"),
        ("1700000000123456789", "ns"),
    ],
)
def test_unit_is_detected_from_magnitude(tmp_path: Path, stamp: str, unit: str) -> None:
    path = write(tmp_path / "u.data", f"1\t2\t3\t{stamp}\n")
    assert detect_ts_unit(path) == unit


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("u.data", "1\t2\t3\t1700000000123\n"),
        ("ratings.dat", "1::2::3::1700000000123\n"),
        ("r.csv", "user_id,item_id,rating,timestamp\n1,2,3,1700000000123\n"),
        ("r.inter", RECBOLE_HEADER + "1\t2\t3\t1700000000123\n"),
    ],
)
def test_millisecond_files_are_read_in_seconds(tmp_path: Path, name: str, text: str) -> None:
    [event] = read_events(write(tmp_path / name, text))
    assert event["ts"] == pytest.approx(1700000000.123)


def test_detection_takes_the_median_so_a_stray_row_does_not_decide(tmp_path: Path) -> None:
    rows = "".join(f"1\t{k}\t3\t{1700000000000 + k}\n" for k in range(5))
    path = write(tmp_path / "u.data", "1\t0\t3\t881250949\n" + rows + "bad line\n")
    assert detect_ts_unit(path) == "ms"


def test_detection_looks_only_at_the_start_of_the_file(tmp_path: Path) -> None:
    seconds = "1\t2\t3\t1700000000\n" * TS_SAMPLE
    path = write(tmp_path / "u.data", seconds + "1\t2\t3\t1700000000000\n" * (TS_SAMPLE + 1))
    assert detect_ts_unit(path) == "s"


def test_a_file_without_times_is_in_seconds(tmp_path: Path) -> None:
    assert detect_ts_unit(write(tmp_path / "p.csv", "user_id,item_id\nu,i\n")) == "s"


def test_given_unit_overrides_detection(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t2\t3\t1700000000\n")
    [event] = read_events(path, ts_unit="ms")
    assert event["ts"] == pytest.approx(1700000.0)


def test_assumed_unit_applies_within_its_block_and_yields_to_a_given_one(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t2\t3\t1700000000\n")
    with assume_ts_unit("us"):
        assert next(read_events(path))["ts"] == pytest.approx(1700.0)
        assert next(read_events(path, ts_unit="s"))["ts"] == 1700000000.0
    assert next(read_events(path))["ts"] == 1700000000.0


def test_unknown_unit_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", "1\t2\t3\t4\n")
    with pytest.raises(ValueError, match=r"unknown timestamp unit 'hours'.*s, ms, us, ns, day"):
        read_events(path, ts_unit="hours")
    with pytest.raises(ValueError, match="unknown timestamp unit"), assume_ts_unit("hours"):
        pass


def test_json_lines_are_seconds_unless_told_otherwise(tmp_path: Path) -> None:
    event = {"type": "click", "user_id": "u1", "item_id": "i1", "ts": 1700000000123}
    path = write(tmp_path / "e.jsonl", json.dumps(event) + "\n" + json.dumps([event]) + "\n")
    assert detect_ts_unit(path) == "s"  # the schema's ts is seconds; the validator judges it
    assert list(read_events(path)) == [event, event]
    converted = list(read_events(path, ts_unit="ms"))
    assert [e["ts"] for e in converted] == [pytest.approx(1700000000.123)] * 2
    assert event["ts"] == 1700000000123  # converted in a copy


# --- fetching datasets ---------------------------------------------------------------------------

INTER = RECBOLE_HEADER + "1\t2\t3\t881250949\n2\t3\t4\t881250950\n"
FAKE_PIP = '''#!{python}
"""Stands in for `python -m pip download`: logs its arguments, then behaves as told."""
import json, pathlib, sys, zipfile
here = pathlib.Path(__file__).parent
with open(here / "calls.jsonl", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
behaviour = (here / "behaviour").read_text()
if behaviour == "no-pip":
    sys.exit(sys.stderr.write(sys.executable + ": No module named pip\\n") and 1)
if behaviour == "refused":
    sys.stderr.write(
        "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None))"
        " after connection broken by 'NewConnectionError(\\"HTTPConnection(host='127.0.0.1', "
        "port=9): Failed to establish a new connection: [Errno 111] Connection refused\\")': "
        "/simple/recbole/\\n"
        "ERROR: Could not find a version that satisfies the requirement recbole==1.2.1\\n"
    )
    sys.exit(1)
dest = pathlib.Path(sys.argv[sys.argv.index("--dest") + 1])
with zipfile.ZipFile(dest / "recbole-1.2.1-py3-none-any.whl", "w") as wheel:
    wheel.writestr("recbole/__init__.py", "")
    wheel.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", {inter!r})
'''


@pytest.fixture
def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """An executable standing in for the interpreter pip runs under; its folder, for control."""
    folder = tmp_path / "fakepython"
    folder.mkdir()
    script = folder / "python"
    script.write_text(FAKE_PIP.format(python=sys.executable, inter=INTER))
    script.chmod(0o755)
    (folder / "behaviour").write_text("wheel")
    return script, folder


def small_spec(**changes: object) -> DatasetSpec:
    fields: dict[str, object] = {
        "sha256": hashlib.sha256(INTER.encode()).hexdigest(),
        "rows": 2,
        **changes,
    }
    return dataclasses.replace(DATASETS["ml-100k"], **fields)  # type: ignore[arg-type]


def calls(folder: Path) -> list[list[str]]:
    log = folder / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_the_registry_pins_movielens_100k_in_the_recbole_wheel(tmp_path: Path) -> None:
    spec = DATASETS["ml-100k"]
    assert (spec.package, spec.version, spec.rows) == ("recbole", "1.2.1", 100_000)
    assert spec.member == "recbole/dataset_example/ml-100k/ml-100k.inter"
    assert len(spec.sha256) == 64
    assert dataset_path("ml-100k", tmp_path) == tmp_path / "data/ml-100k/ml-100k.inter"


def test_unknown_dataset_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'ml-1m'; known: ml-100k"):
        fetch_dataset("ml-1m", tmp_path)


def test_fetch_extracts_the_member_once(tmp_path: Path, fake_python: tuple[Path, Path]) -> None:
    python, folder = fake_python
    home = tmp_path / "home"
    first = fetch_dataset(small_spec(), home, python=str(python))
    again = fetch_dataset(small_spec(), home, python=str(python))
    assert (first.downloaded, again.downloaded) == (True, False)
    assert first.path == again.path == home / "data/ml-100k/ml-100k.inter"
    assert first.path.read_text() == INTER
    assert (first.rows, first.sha256) == (2, small_spec().sha256)
    assert sorted(p.name for p in first.path.parent.iterdir()) == ["ml-100k.inter"]
    [args] = calls(folder)  # the second call only checked the checksum
    assert args[:4] == ["-m", "pip", "download", "--no-deps"]
    assert "--only-binary=:all:" in args
    assert args[-1] == "recbole==1.2.1"


def test_fetch_replaces_a_damaged_file(tmp_path: Path, fake_python: tuple[Path, Path]) -> None:
    python, _ = fake_python
    target = dataset_path("ml-100k", tmp_path)
    target.parent.mkdir(parents=True)
    target.write_text(INTER[:-5])  # cut short
    with pytest.raises(FileNotFoundError, match="does not match the pinned checksum"):
        find_dataset(small_spec(), tmp_path)
    assert fetch_dataset(small_spec(), tmp_path, python=str(python)).downloaded
    assert find_dataset(small_spec(), tmp_path).read_text() == INTER


def test_force_downloads_over_an_intact_file(
    tmp_path: Path, fake_python: tuple[Path, Path]
) -> None:
    python, folder = fake_python
    fetch_dataset(small_spec(), tmp_path, python=str(python))
    assert fetch_dataset(small_spec(), tmp_path, python=str(python), force=True).downloaded
    assert len(calls(folder)) == 2


def test_a_member_unlike_the_pin_is_not_installed(
    tmp_path: Path, fake_python: tuple[Path, Path]
) -> None:
    python, _ = fake_python
    with pytest.raises(RuntimeError, match=r"is not the pinned ml-100k.*nothing installed"):
        fetch_dataset(small_spec(sha256="0" * 64), tmp_path, python=str(python))
    assert list(dataset_path("ml-100k", tmp_path).parent.iterdir()) == []


def test_a_wheel_without_the_member_is_named(
    tmp_path: Path, fake_python: tuple[Path, Path]
) -> None:
    python, _ = fake_python
    with pytest.raises(RuntimeError, match=r"holds no recbole/dataset_example/x\.inter"):
        fetch_dataset(
            small_spec(member="recbole/dataset_example/x.inter"), tmp_path, python=str(python)
        )


def test_missing_pip_says_how_to_install_it(tmp_path: Path, fake_python: tuple[Path, Path]) -> None:
    python, folder = fake_python
    (folder / "behaviour").write_text("no-pip")
    with pytest.raises(RuntimeError, match=r"pip is not installed for .*-m ensurepip"):
        fetch_dataset(small_spec(), tmp_path, python=str(python))


def test_an_unreachable_index_is_reported_in_pips_words(
    tmp_path: Path, fake_python: tuple[Path, Path]
) -> None:
    python, folder = fake_python
    (folder / "behaviour").write_text("refused")
    with pytest.raises(RuntimeError) as caught:
        fetch_dataset(small_spec(), tmp_path, python=str(python))
    assert str(caught.value) == (
        "could not download recbole 1.2.1 from the package index: [Errno 111] Connection "
        "refused; Could not find a version that satisfies the requirement recbole==1.2.1"
    )
    assert not dataset_path("ml-100k", tmp_path).exists()


def test_data_path_without_the_file_says_to_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FRESHREC_HOME", str(tmp_path))
    assert cli.main(["data", "path", "ml-100k"]) == 2
    assert "run `freshrec data fetch ml-100k`" in capsys.readouterr().err


def test_data_path_prints_where_an_intact_file_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FRESHREC_HOME", str(tmp_path))
    monkeypatch.setitem(DATASETS, "ml-100k", small_spec())
    target = dataset_path("ml-100k", tmp_path)
    target.parent.mkdir(parents=True)
    target.write_text(INTER)
    assert cli.main(["data", "path", "ml-100k", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "ml-100k", "path": str(target)}


def test_the_cli_offers_every_timestamp_unit() -> None:
    assert tuple(TS_UNITS) == cli._TS_UNITS


def test_eval_reads_the_file_in_the_unit_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from freshrec.evaluation import prequential

    def run_eval(settings: object, path: Path, **kwargs: object) -> dict[str, object]:
        # Stands in for the evaluation, which reads the file through read_events without a unit.
        return {"ts": [e["ts"] for e in read_events(path, kwargs["fmt"])]}  # type: ignore[arg-type]

    monkeypatch.setattr(prequential, "run_eval", run_eval)
    monkeypatch.setattr(prequential, "format_summary", str)
    path = write(tmp_path / "u.data", "1\t2\t3\t1700000000\n")
    assert cli.main(["eval", str(path), "--json"]) == 0
    assert cli.main(["eval", str(path), "--json", "--ts-unit", "ms"]) == 0
    detected, given = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert detected == {"ts": [1700000000.0]}
    assert given == {"ts": [pytest.approx(1700000.0)]}
