"""A command whose Kafka or Redis is out of reach ends with a message (and a JSON error under
``--json``) and status 2, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from freshrec.cli import main
from tests.support import free_port


def test_a_redis_out_of_reach_is_an_error_message_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("user_id,item_id,rating,timestamp\nu1,i1,4,1700000000\n")
    monkeypatch.setenv("FRESHREC_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["eval", str(ratings), "--mode", "direct", "--json"]) == 2
    out, err = capsys.readouterr()
    answer = json.loads(out)
    assert answer["kind"] == "ConnectionError" and "Connection refused" in answer["error"]
    assert "Traceback" not in err
