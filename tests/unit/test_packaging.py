"""The wheel installs one package, ``freshrec``, and every room inside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("models", "store", "streams", "serving", "evaluation", "bench", "devenv")


def test_the_wheel_holds_only_the_freshrec_namespace(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the work tree
    skip = shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, source, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), "."],
        check=True,
        cwd=source,
    )
    (wheel,) = tmp_path.glob("freshrec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"freshrec", next(t for t in top if t.endswith(".dist-info"))}
    for room in ROOMS:
        assert f"freshrec/{room}/__init__.py" in names
    assert "freshrec/models/mf.py" in names and "freshrec/cli.py" in names
