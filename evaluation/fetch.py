"""Fetch public datasets into the cache folder, once, for evaluation, tests and the demo.

A dataset is a file inside a package on the package index (MovieLens 100K ships in the
``recbole`` wheel as a RecBole atomic file), so fetching needs nothing but pip: the wheel is
downloaded without its dependencies into a temporary folder, and only the dataset's member is
extracted, to ``<FRESHREC_HOME>/data/<name>/<file>``. The file is written under a temporary
name beside its destination and renamed into place only once its SHA-256 matches the pinned
one, so a reader never sees half a file and an interrupted fetch leaves nothing behind. A file
already there with the pinned checksum is not fetched again. Data never enters the repository.

More datasets are one more :data:`DATASETS` entry.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "Fetched",
    "dataset_path",
    "ensure_dataset",
    "fetch_dataset",
    "find_dataset",
]

PIP_TIMEOUT_S = 600.0
"""Longest a ``pip download`` may take before the fetch gives up."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset comes from and what it must be once extracted."""

    name: str
    package: str
    version: str
    member: str
    """Path of the dataset's file inside the package's wheel."""
    rows: int
    """Data rows, the header excluded."""
    sha256: str
    """Of the extracted file; computed once from the published wheel and pinned."""
    description: str = ""

    @property
    def filename(self) -> str:
        return PurePosixPath(self.member).name

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="ml-100k",
            package="recbole",
            version="1.2.1",
            member="recbole/dataset_example/ml-100k/ml-100k.inter",
            rows=100_000,
            sha256="4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
            description="MovieLens 100K ratings (943 users, 1,682 items, 1997-1998), "
            "RecBole atomic file",
        ),
    )
}


@dataclass(frozen=True)
class Fetched:
    """A dataset in place: where, how many rows, its checksum, and whether this call fetched it."""

    name: str
    path: Path
    rows: int
    sha256: str
    downloaded: bool
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "rows": self.rows,
            "sha256": self.sha256,
            "downloaded": self.downloaded,
            "seconds": round(self.seconds, 3),
        }


def _spec(name: str | DatasetSpec) -> DatasetSpec:
    if isinstance(name, DatasetSpec):
        return name
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}"
        ) from None


def dataset_path(name: str | DatasetSpec, home: str | os.PathLike[str]) -> Path:
    """Where dataset ``name`` lives under the cache folder ``home``, fetched or not."""
    spec = _spec(name)
    return Path(home).expanduser() / "data" / spec.name / spec.filename


def _digest(path: Path) -> tuple[str, int]:
    """SHA-256 and data rows (lines after the one header line) of ``path``."""
    sha = hashlib.sha256()
    lines = 0
    last = b"\n"
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            sha.update(block)
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"
    return sha.hexdigest(), max(lines - 1, 0)


def _valid(path: Path, spec: DatasetSpec) -> tuple[str, int] | None:
    if not path.is_file():
        return None
    sha, rows = _digest(path)
    return (sha, rows) if sha == spec.sha256 and rows == spec.rows else None


def find_dataset(name: str | DatasetSpec, home: str | os.PathLike[str]) -> Path:
    """The path of dataset ``name`` if it is in place and intact, else FileNotFoundError."""
    spec = _spec(name)
    path = dataset_path(spec, home)
    if not path.exists():
        raise FileNotFoundError(
            f"dataset {spec.name} is not in {path.parent}; run `freshrec data fetch {spec.name}`"
        )
    if _valid(path, spec) is None:
        raise FileNotFoundError(
            f"{path} does not match the pinned checksum of {spec.name}; run "
            f"`freshrec data fetch {spec.name}` to replace it"
        )
    return path


def fetch_dataset(
    name: str | DatasetSpec,
    home: str | os.PathLike[str],
    *,
    force: bool = False,
    python: str = sys.executable,
    log: Any = None,
) -> Fetched:
    """Put dataset ``name`` under ``home`` unless it is already there intact; what is there.

    Downloads with ``python -m pip download --no-deps --only-binary=:all:`` (pip's own cache
    and configuration apply, so an index mirror set for pip is used). ``force`` fetches even
    over an intact file. ``log``, if given, is called with a line of progress. Raises
    RuntimeError when pip is missing, the index cannot be reached, or what it serves is not
    the pinned file; TimeoutError after :data:`PIP_TIMEOUT_S`.
    """
    spec = _spec(name)
    target = dataset_path(spec, home)
    started = time.perf_counter()
    if not force and (found := _valid(target, spec)) is not None:
        sha, rows = found
        return Fetched(spec.name, target, rows, sha, False, time.perf_counter() - started)
    if log is not None:
        log(f"fetching {spec.name}: {spec.requirement} from the package index with pip")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="freshrec-fetch-") as folder:
        wheel = _download(spec, Path(folder), python)
        sha, rows = _extract(wheel, spec, target)
    return Fetched(spec.name, target, rows, sha, True, time.perf_counter() - started)


def ensure_dataset(name: str | DatasetSpec, home: str | os.PathLike[str]) -> Path:
    """The path of dataset ``name`` under ``home``, fetched first if it is not there intact.

    For tests and tools: the first caller on a machine downloads, every later one only checks
    the checksum (a few milliseconds).
    """
    return fetch_dataset(name, home).path


def _download(spec: DatasetSpec, folder: Path, python: str) -> Path:
    command = [
        python,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        # Only a file is taken from the wheel, so whether it would install here is irrelevant.
        "--ignore-requires-python",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--retries",
        "3",
        "--dest",
        str(folder),
        spec.requirement,
    ]
    where = f"{spec.package} {spec.version}"
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise RuntimeError(f"cannot download {where}: no Python interpreter at {python}") from None
    except subprocess.TimeoutExpired:
        raise TimeoutError(
            f"could not download {where} from the package index: pip took over "
            f"{PIP_TIMEOUT_S:.0f} s"
        ) from None
    if done.returncode != 0:
        if "No module named pip" in done.stderr:
            raise RuntimeError(
                f"cannot download {where}: pip is not installed for {python}; install it "
                f"with `{python} -m ensurepip` (or your package manager's python3-pip)"
            )
        raise RuntimeError(
            f"could not download {where} from the package index: "
            f"{_pip_reason(done.stderr, done.returncode)}"
        )
    wheels = sorted(folder.glob(f"{spec.package}-{spec.version}-*.whl"))
    if not wheels:
        raise RuntimeError(
            f"pip reported success but left no {spec.package}-{spec.version} wheel in {folder}"
        )
    return wheels[0]


def _pip_reason(stderr: str, returncode: int) -> str:
    """pip's own words for a failed download: the connection error if any, then its errors."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reasons = []
    broken = [line for line in lines if "connection broken by" in line or "Errno" in line]
    if broken:
        errno = re.search(r"\[Errno -?\d+\][^'\")]*", broken[-1])
        reasons.append(errno.group(0).strip() if errno else broken[-1])
    reasons += [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
    if not reasons and lines:
        reasons.append(lines[-1])
    return "; ".join(reasons) or f"pip exited with status {returncode}"


def _extract(wheel: Path, spec: DatasetSpec, target: Path) -> tuple[str, int]:
    """Copy ``spec.member`` out of ``wheel`` to ``target`` atomically; its SHA-256 and rows."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.{time.monotonic_ns()}.partial")
    try:
        try:
            with (
                zipfile.ZipFile(wheel) as archive,
                archive.open(spec.member) as member,
                partial.open("wb") as out,
            ):
                while block := member.read(1 << 20):
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
        except KeyError:
            raise RuntimeError(f"{wheel.name} holds no {spec.member}") from None
        except zipfile.BadZipFile as exc:
            raise RuntimeError(f"{wheel.name} is not a readable wheel: {exc}") from None
        sha, rows = _digest(partial)
        if sha != spec.sha256 or rows != spec.rows:
            raise RuntimeError(
                f"{spec.member} from {wheel.name} is not the pinned {spec.name}: sha256 {sha} "
                f"with {rows} rows, expected {spec.sha256} with {spec.rows}; nothing installed"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return sha, rows
