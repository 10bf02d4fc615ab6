"""Where numba caches the funnel's kernels: under FRESHREC_HOME unless NUMBA_CACHE_DIR is set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SHOW = (
    "import os; from freshrec.serving.recall import merge_channels; "
    "print(os.environ['NUMBA_CACHE_DIR']); print(merge_channels.stats.cache_path)"
)


def _cache_of_a_fresh_process(**env: str) -> tuple[str, str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "FRESHREC_HOME")}
    out = subprocess.run(
        [sys.executable, "-c", SHOW],
        env={**environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split("\n")
    return out[0], out[1]


def test_the_kernels_are_cached_under_freshrec_home_not_beside_the_source(tmp_path: Path) -> None:
    variable, folder = _cache_of_a_fresh_process(
        FRESHREC_HOME=str(tmp_path), FRESHREC_PARTITIONS="not a number"
    )
    assert variable == str(tmp_path / "numba")
    assert Path(folder).parent == tmp_path / "numba"  # not serving/__pycache__


def test_a_cache_folder_the_user_chose_is_kept(tmp_path: Path) -> None:
    variable, folder = _cache_of_a_fresh_process(
        FRESHREC_HOME=str(tmp_path / "home"), NUMBA_CACHE_DIR=str(tmp_path / "mine")
    )
    assert variable == str(tmp_path / "mine")
    assert Path(folder).parent == tmp_path / "mine"
