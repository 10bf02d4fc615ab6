"""The run's child processes: a restart policy like a deployment supervisor's."""

from __future__ import annotations

from pathlib import Path

import pytest

from freshrec.devenv.processes import Children
from freshrec.settings import Settings


@pytest.mark.parametrize(
    ("args", "status", "restarts"),
    [
        (["no-such-command"], 2, [2, 2]),  # a status to recover from: restarted twice
        (["--help"], 0, []),  # any other (here 0): reported at once
    ],
)
def test_a_failed_process_is_started_again_as_often_as_allowed_then_reported(
    tmp_path: Path, args: list[str], status: int, restarts: list[int]
) -> None:
    children = Children(tmp_path, Settings())
    children.start("child", args, restarts=2, restart_on=(2,))
    try:
        with pytest.raises(RuntimeError, match=f"exited early with code {status}"):
            children.wait(lambda: False, 60, "the restarts to run out")
    finally:
        children.stop()
    assert children.restarts == {"child": restarts}
    # One log across restarts: every run's output, the first run's included.
    runs = children.log("child").read_text().count("usage: freshrec")
    assert runs == len(restarts) + 1
