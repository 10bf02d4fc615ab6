"""Read ratings files of every contract format as a stream of events.

Supported: MovieLens ``u.data`` (``user<TAB>item<TAB>rating<TAB>unix_ts``), MovieLens
``ratings.dat`` (``user::item::rating::ts``), CSV with a header naming at least the user and
item columns, and JSON lines of events (one event object or an array of events per line). Any
of them may be gzip-compressed; compression is recognised by content, not by name.

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
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

__all__ = ["FORMATS", "RAW_KEY", "count_lines", "detect_format", "read_events"]

FORMATS = ("movielens-udata", "movielens-dat", "csv", "jsonl")
RAW_KEY = "__raw__"

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
    "ts": ("timestamp", "ts", "time", "eventtime", "datetime"),
}
_EXPECTED = (
    "expected MovieLens u.data (user<TAB>item<TAB>rating<TAB>unix_ts), MovieLens ratings.dat "
    "(user::item::rating::ts), CSV with a header naming user_id and item_id, or JSON lines of "
    "events"
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


def _csv_columns(header: str) -> tuple[str, dict[str, int]] | None:
    """Delimiter and {contract field: column index} of a header line, or None if not one."""
    for delimiter in _CSV_DELIMITERS:
        if delimiter not in header:
            continue
        names = [_normalise_header(n) for n in next(csv.reader([header], delimiter=delimiter))]
        columns: dict[str, int] = {}
        for field, aliases in _COLUMN_ALIASES.items():
            for alias in aliases:
                if alias in names:
                    columns[field] = names.index(alias)
                    break
        if "user_id" in columns and "item_id" in columns:
            return delimiter, columns
    return None


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
    lines: IO[bytes], split: Callable[[str], list[str]], prefix: str
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
                "ts": float(ts),
            }
        except (UnicodeDecodeError, ValueError):
            yield _raw(line)
            continue
        yield event


def _parse_ts(text: str) -> float:
    """Unix seconds from a number or an ISO 8601 time (naive times are taken as UTC)."""
    try:
        return float(text)
    except ValueError:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()


def _csv_events(path: PathLike, lines: IO[bytes], prefix: str) -> Iterator[dict[str, Any]]:
    columns: dict[str, int] | None = None
    delimiter = ","
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            if columns is None:
                raise ValueError(f"{path}: the CSV header is not UTF-8 text") from None
            yield _raw(line)
            continue
        if columns is None:
            found = _csv_columns(text)
            if found is None:
                raise ValueError(
                    f"{path}: line {number} is not a CSV header naming user_id and item_id"
                )
            delimiter, columns = found
            continue
        try:
            row = next(csv.reader([text], delimiter=delimiter))
            cell = {field: row[index].strip() for field, index in columns.items()}
        except (csv.Error, IndexError):
            yield _raw(line)
            continue
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
                event["ts"] = _parse_ts(cell["ts"])
        except ValueError:
            yield _raw(line)
            continue
        yield event


def _jsonl_events(lines: IO[bytes]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.strip():
            continue
        try:
            payload = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            yield _raw(line)
            continue
        if isinstance(payload, dict):
            yield payload
        elif isinstance(payload, list):
            for element in payload:
                # An array element that is not an object cannot be an event; its own
                # serialisation is the closest thing to its original bytes.
                yield (
                    element
                    if isinstance(element, dict)
                    else {RAW_KEY: json.dumps(element).encode()}
                )
        else:
            yield _raw(line)


def read_events(path: PathLike, fmt: str | None = None) -> Iterator[dict[str, Any]]:
    """Stream the events of ``path``, detecting its format unless ``fmt`` names one.

    Ratings formats yield ``rating`` events with string ids, float value and ts, and the
    deterministic ``event_id`` ``"<file name>:<line number>"`` (``.gz`` dropped), so replaying
    a file twice is recognisable as a duplicate. JSON objects pass through unchanged. Lines
    that cannot become an event are yielded as ``{"__raw__": bytes}``.
    """
    if fmt is None:
        fmt = detect_format(path)
    elif fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return _read(path, fmt)


def _read(path: PathLike, fmt: str) -> Iterator[dict[str, Any]]:
    prefix = _id_prefix(path)
    with _Lines(path) as lines:
        if fmt == "jsonl":
            yield from _jsonl_events(lines)
        elif fmt == "csv":
            yield from _csv_events(path, lines, prefix)
        elif fmt == "movielens-dat":
            yield from _rating_events(lines, lambda s: s.split("::"), prefix)
        else:
            yield from _rating_events(lines, _split_udata, prefix)


def count_lines(path: PathLike) -> int:
    """Physical lines of the (decompressed) file, counted in 1 MiB blocks for progress bars."""
    count = 0
    last = b"\n"
    with _Lines(path) as stream:
        while block := stream.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")
