"""Read ratings files of every contract format as a stream of events.

Supported: MovieLens ``u.data`` (``user<TAB>item<TAB>rating<TAB>unix_ts``), MovieLens
``ratings.dat`` (``user::item::rating::ts``), CSV with a header naming at least the user and
item columns, RecBole atomic interaction files (``.inter``: tab-separated, a header of
``name:type`` columns such as ``user_id:token<TAB>item_id:token<TAB>rating:float<TAB>
timestamp:float``), and JSON lines of events (one event object or an array of events per
line). Any of them may be gzip-compressed; compression is recognised by content, not by name.

Times. Events carry unix seconds; files do not always. A time that is not a number is read as
ISO 8601 (``2005-09-06`` is that day's UTC midnight, naive times are UTC), whatever the unit.
Numbers are scaled by a unit (:data:`TS_UNITS`): given by the caller, else by
:func:`assume_ts_unit`, else detected by :func:`detect_ts_unit` from the magnitude of the
median of the file's first numeric times (see there). Days since the epoch (``day``) are never
guessed: a small number is as likely a synthetic clock in seconds, so that unit must be named.

Files are read line by line so a replay of a large dataset never holds it in memory. Nothing
here validates the event schema: that is the job of the single validator downstream, so a
dataset replay and a live producer are judged by the same rules. A line that cannot even be
turned into an event is yielded as ``{"__raw__": original_line_bytes}`` so the caller can send
those exact bytes to the dead-letter topic with a reason instead of stopping the replay.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

__all__ = [
    "FORMATS",
    "RAW_KEY",
    "TS_UNITS",
    "assume_ts_unit",
    "count_lines",
    "detect_format",
    "detect_ts_unit",
    "read_events",
]

FORMATS = ("movielens-udata", "movielens-dat", "csv", "recbole", "jsonl")
RAW_KEY = "__raw__"
TS_UNITS: dict[str, float] = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9, "day": 86_400.0}
"""Seconds per unit of a file's numeric times."""
TS_SAMPLE = 1000
"""Numeric times :func:`detect_ts_unit` looks at, from the start of the file."""
# Lower bounds of the median numeric time, largest first. 1e11 s is the year 5138 while 1e11 ms
# is March 1973, so every plausible event time of the last fifty years falls clearly on one side.
_TS_THRESHOLDS = (("ns", 1e17), ("us", 1e14), ("ms", 1e11))
_assumed_ts_unit: ContextVar[str | None] = ContextVar("freshrec_assumed_ts_unit", default=None)

_GZIP_MAGIC = b"\x1f\x8b"
_CSV_DELIMITERS = (",", "\t", ";", "|")
# Header names are compared after lower-casing and dropping "_", "-" and spaces, so
# "user_id", "userId" (MovieLens ratings.csv) and "User ID" all name the same column.
_COLUMN_ALIASES = {
    "event_id": ("eventid", "id"),
    "type": ("type", "eventtype", "event"),
    "user_id": ("userid", "user", "uid", "customerid"),
    "item_id": ("itemid", "item", "iid", "movieid", "productid"),
    "value": ("rating", "value", "score"),
    "ts": ("timestamp", "ts", "time", "eventtime", "datetime", "date"),
}
# RecBole's atomic files type every header column; these are its field types.
_RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
_EXPECTED = (
    "expected MovieLens u.data (user<TAB>item<TAB>rating<TAB>unix_ts), MovieLens ratings.dat "
    "(user::item::rating::ts), CSV with a header naming user_id and item_id, a RecBole atomic "
    "file (.inter, tab-separated name:type header), or JSON lines of events"
)

PathLike = str | os.PathLike[str]


class _Lines:
    """Context manager over a file's lines as bytes, closing the underlying file too."""

    def __init__(self, path: PathLike) -> None:
        self._raw = open(path, "rb")  # noqa: SIM115 - closed in __exit__
        magic = self._raw.read(2)
        self._raw.seek(0)
        self._stream: IO[bytes] = (
            gzip.GzipFile(fileobj=self._raw, mode="rb") if magic == _GZIP_MAGIC else self._raw
        )

    def __enter__(self) -> IO[bytes]:
        return self._stream

    def __exit__(self, *exc: object) -> None:
        if self._stream is not self._raw:
            self._stream.close()
        self._raw.close()


def _strip_eol(line: bytes) -> bytes:
    return line.rstrip(b"\r\n")


def _first_line(path: PathLike) -> str:
    """The first non-empty line, decoded; ValueError if there is none or it is not text."""
    try:
        with _Lines(path) as lines:
            for number, line in enumerate(lines, start=1):
                stripped = line.strip()
                if not stripped:
                    continue
                try:
                    return stripped.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise ValueError(
                        f"{path}: line {number} is not UTF-8 text; {_EXPECTED}"
                    ) from None
    except (gzip.BadGzipFile, EOFError) as exc:
        raise ValueError(f"{path}: damaged gzip data ({exc}); {_EXPECTED}") from None
    raise ValueError(f"{path}: the file has no non-empty line; {_EXPECTED}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _split_udata(line: str) -> list[str]:
    fields = line.split("\t")
    return fields if len(fields) == 4 else line.split()


def _looks_like_rating_row(fields: list[str]) -> bool:
    return (
        len(fields) == 4
        and all(f.strip() for f in fields[:2])
        and _is_number(fields[2])
        and _is_number(fields[3])
    )


def _normalise_header(name: str) -> str:
    return "".join(ch for ch in name.strip().lower() if ch not in "_- ")


def _map_columns(names: list[str]) -> dict[str, int] | None:
    """{contract field: column index} of header names, or None without user and item."""
    normalised = [_normalise_header(n) for n in names]
    columns: dict[str, int] = {}
    for field, aliases in _COLUMN_ALIASES.items():
        for alias in aliases:
            if alias in normalised:
                columns[field] = normalised.index(alias)
                break
    return columns if "user_id" in columns and "item_id" in columns else None


def _csv_columns(header: str) -> tuple[str, dict[str, int]] | None:
    """Delimiter and {contract field: column index} of a header line, or None if not one."""
    for delimiter in _CSV_DELIMITERS:
        if delimiter not in header:
            continue
        columns = _map_columns(next(csv.reader([header], delimiter=delimiter)))
        if columns is not None:
            return delimiter, columns
    return None


def _recbole_columns(header: str) -> dict[str, int] | None:
    """{contract field: column index} of a RecBole atomic-file header, or None if not one.

    Every tab-separated column must read ``name:type`` with one of RecBole's field types, and
    the names must include a user and an item column.
    """
    names = []
    for column in header.split("\t"):
        name, colon, kind = column.strip().rpartition(":")
        if not colon or not name or kind not in _RECBOLE_TYPES:
            return None
        names.append(name)
    return _map_columns(names)


def detect_format(path: PathLike) -> str:
    """Name the format of ``path`` from its first non-empty line.

    One line is enough for every contract format and keeps detection cheap on huge or
    compressed files. Raises ValueError naming the file and the accepted formats otherwise.
    """
    line = _first_line(path)
    if line[0] in "{[":
        return "jsonl"
    if "::" in line and _looks_like_rating_row(line.split("::")):
        return "movielens-dat"
    if _looks_like_rating_row(_split_udata(line)):
        return "movielens-udata"
    if _recbole_columns(line) is not None:
        return "recbole"
    if _csv_columns(line) is not None:
        return "csv"
    raise ValueError(
        f"{path}: cannot tell the format from its first line {line[:80]!r}; {_EXPECTED}"
    )


def _id_prefix(path: PathLike) -> str:
    """Base of generated event ids; compressing a file does not change its events' ids."""
    name = Path(path).name
    return name[:-3] if name.endswith(".gz") else name


def _raw(line: bytes) -> dict[str, bytes]:
    return {RAW_KEY: _strip_eol(line)}


def _rating_events(
    lines: IO[bytes], split: Callable[[str], list[str]], prefix: str, scale: float
) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            fields = split(line.decode("utf-8-sig" if number == 1 else "utf-8").strip())
            user, item, rating, ts = fields
            event = {
                "event_id": f"{prefix}:{number}",
                "type": "rating",
                "user_id": user.strip(),
                "item_id": item.strip(),
                "value": float(rating),
                "ts": float(ts) * scale,
            }
        except (UnicodeDecodeError, ValueError):
            yield _raw(line)
            continue
        yield event


def _parse_ts(text: str, scale: float = 1.0) -> float:
    """Unix seconds from a number in units of ``scale`` seconds, or from an ISO 8601 time.

    ISO times ignore the unit: a date alone is its UTC midnight, naive times are taken as UTC.
    """
    try:
        return float(text) * scale
    except ValueError:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()


def _cell_event(
    cell: dict[str, str], number: int, prefix: str, scale: float
) -> dict[str, Any] | None:
    """The event of one row of a headed file, by contract field; None if a number is not one."""
    has_value = bool(cell.get("value"))
    event: dict[str, Any] = {
        "event_id": cell.get("event_id") or f"{prefix}:{number}",
        # A file of bare (user, item) pairs is implicit feedback: the neutral signal is a click.
        "type": cell.get("type") or ("rating" if has_value else "click"),
        "user_id": cell["user_id"],
        "item_id": cell["item_id"],
    }
    try:
        if has_value:
            event["value"] = float(cell["value"])
        if cell.get("ts"):
            event["ts"] = _parse_ts(cell["ts"], scale)
    except ValueError:
        return None
    return event


def _headed_events(
    path: PathLike,
    lines: IO[bytes],
    prefix: str,
    scale: float,
    header: Callable[[str], tuple[Callable[[str], list[str]], dict[str, int]] | None],
    kind: str,
) -> Iterator[dict[str, Any]]:
    """Rows of a file whose first non-empty line is a header ``header`` understands.

    ``header`` returns how to split a row and which column holds each contract field.
    """
    columns: dict[str, int] | None = None
    split: Callable[[str], list[str]] = str.split
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            if columns is None:
                raise ValueError(f"{path}: the {kind} header is not UTF-8 text") from None
            yield _raw(line)
            continue
        if columns is None:
            found = header(text)
            if found is None:
                raise ValueError(
                    f"{path}: line {number} is not a {kind} header naming user_id and item_id"
                )
            split, columns = found
            continue
        try:
            row = split(text)
            cell = {field: row[index].strip() for field, index in columns.items()}
        except (csv.Error, IndexError):
            yield _raw(line)
            continue
        event = _cell_event(cell, number, prefix, scale)
        yield _raw(line) if event is None else event


def _csv_header(text: str) -> tuple[Callable[[str], list[str]], dict[str, int]] | None:
    found = _csv_columns(text)
    if found is None:
        return None
    delimiter, columns = found
    return (lambda row: next(csv.reader([row], delimiter=delimiter))), columns


def _recbole_header(text: str) -> tuple[Callable[[str], list[str]], dict[str, int]] | None:
    # Atomic files are plain tab-separated text: no quoting, so a quote is part of a token.
    columns = _recbole_columns(text)
    return None if columns is None else ((lambda row: row.split("\t")), columns)


def _jsonl_events(lines: IO[bytes], scale: float) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.strip():
            continue
        try:
            payload = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            yield _raw(line)
            continue
        if isinstance(payload, dict):
            yield _scaled(payload, scale)
        elif isinstance(payload, list):
            for element in payload:
                # An array element that is not an object cannot be an event; its own
                # serialisation is the closest thing to its original bytes.
                yield (
                    _scaled(element, scale)
                    if isinstance(element, dict)
                    else {RAW_KEY: json.dumps(element).encode()}
                )
        else:
            yield _raw(line)


def _scaled(event: dict[str, Any], scale: float) -> dict[str, Any]:
    """``event`` itself in seconds; a copy with its numeric ``ts`` scaled in another unit."""
    ts = event.get("ts")
    if scale == 1.0 or isinstance(ts, bool) or not isinstance(ts, int | float):
        return event
    return {**event, "ts": ts * scale}


@contextmanager
def assume_ts_unit(unit: str | None) -> Iterator[None]:
    """Within the block, :func:`read_events` calls that name no unit read numbers in ``unit``.

    For tools that reach :func:`read_events` through other code (``freshrec eval --ts-unit``);
    ``None`` restores detection. Context-local, so concurrent tasks do not see each other's.
    """
    if unit is not None:
        _check_unit(unit)
    token = _assumed_ts_unit.set(unit)
    try:
        yield
    finally:
        _assumed_ts_unit.reset(token)


def _check_unit(unit: str) -> float:
    try:
        return TS_UNITS[unit]
    except KeyError:
        raise ValueError(
            f"unknown timestamp unit {unit!r}; expected one of {', '.join(TS_UNITS)}"
        ) from None


def detect_ts_unit(path: PathLike, fmt: str | None = None) -> str:
    """The unit of the numeric times of ``path``: ``s``, ``ms``, ``us`` or ``ns``.

    The rule, on the median of the first :data:`TS_SAMPLE` times (ISO times count as the
    seconds they are; lines that are not events are skipped): at least 1e17 is nanoseconds,
    at least 1e14 microseconds, at least 1e11 milliseconds, anything smaller seconds. In
    seconds 1e11 is the year 5138; in milliseconds it is March 1973, so real event times from
    1973 on are told apart. A file with no time is in seconds. JSON lines are always in
    seconds: they are events of the schema, whose ``ts`` is unix seconds; name the unit to
    read others. ``day`` is never detected.
    """
    fmt = fmt or detect_format(path)
    if fmt == "jsonl":
        return "s"
    times: list[float] = []
    with _Lines(path) as lines:
        for event in _parse(path, fmt, lines, scale=1.0):
            if isinstance(event.get("ts"), float):
                times.append(event["ts"])
                if len(times) >= TS_SAMPLE:
                    break
    if not times:
        return "s"
    median = statistics.median(times)
    for unit, floor in _TS_THRESHOLDS:
        if median >= floor:
            return unit
    return "s"


def read_events(
    path: PathLike, fmt: str | None = None, ts_unit: str | None = None
) -> Iterator[dict[str, Any]]:
    """Stream the events of ``path``, detecting its format unless ``fmt`` names one.

    Ratings formats yield ``rating`` events with string ids, float value and ts, and the
    deterministic ``event_id`` ``"<file name>:<line number>"`` (``.gz`` dropped), so replaying
    a file twice is recognisable as a duplicate. Headed formats (CSV, RecBole) without a
    rating column yield ``click`` events. JSON objects pass through unchanged (unless a unit
    other than seconds is named: then their numeric ``ts`` is converted in a copy). Lines that
    cannot become an event are yielded as ``{"__raw__": bytes}``.

    ``ts_unit`` (a key of :data:`TS_UNITS`) is the unit of the file's numeric times; when
    None, the unit set by :func:`assume_ts_unit`, else the one :func:`detect_ts_unit` finds.
    Every ``ts`` yielded is in unix seconds.
    """
    if fmt is None:
        fmt = detect_format(path)
    elif fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    unit = ts_unit or _assumed_ts_unit.get() or detect_ts_unit(path, fmt)
    return _read(path, fmt, _check_unit(unit))


def _read(path: PathLike, fmt: str, scale: float) -> Iterator[dict[str, Any]]:
    with _Lines(path) as lines:
        yield from _parse(path, fmt, lines, scale)


def _parse(path: PathLike, fmt: str, lines: IO[bytes], scale: float) -> Iterator[dict[str, Any]]:
    """Events of the open ``lines`` of a ``fmt`` file, numeric times scaled by ``scale``."""
    prefix = _id_prefix(path)
    if fmt == "jsonl":
        yield from _jsonl_events(lines, scale)
        return
    if fmt == "movielens-dat":
        events = _rating_events(lines, lambda s: s.split("::"), prefix, scale)
    elif fmt == "movielens-udata":
        events = _rating_events(lines, _split_udata, prefix, scale)
    elif fmt == "csv":
        events = _headed_events(path, lines, prefix, scale, _csv_header, "CSV")
    else:
        events = _headed_events(path, lines, prefix, scale, _recbole_header, "RecBole")
    yield from events


def count_lines(path: PathLike) -> int:
    """Physical lines of the (decompressed) file, counted in 1 MiB blocks for progress bars."""
    count = 0
    last = b"\n"
    with _Lines(path) as stream:
        while block := stream.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")
