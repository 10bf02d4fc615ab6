"""Kafka cluster ids: never one the storage tool's argument parser would read as an option."""

from __future__ import annotations

import base64
import uuid

from freshrec.devenv.local_services import kafka_cluster_id


def test_an_id_starting_with_a_dash_is_drawn_again() -> None:
    dash_first = b"\xf8" + bytes(15)  # 0b111110... encodes to '-' in the URL-safe alphabet
    good = uuid.UUID(int=1).bytes
    assert base64.urlsafe_b64encode(dash_first).decode().startswith("-")
    draws = iter([dash_first, dash_first, good])

    cluster_id = kafka_cluster_id(lambda: next(draws))

    assert cluster_id == base64.urlsafe_b64encode(good).decode().rstrip("=")
    assert next(draws, None) is None


def test_ids_are_22_url_safe_characters() -> None:
    for _ in range(500):
        cluster_id = kafka_cluster_id()
        assert len(cluster_id) == 22 and not cluster_id.startswith("-")
        assert base64.urlsafe_b64decode(cluster_id + "==") != b""
