"""A concept change in the live stream shows in the worker's drift metric and at GET /drift."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from freshrec.evaluation.synth import SynthConfig, generate
from freshrec.settings import Settings
from freshrec.streams.producer import EventProducer
from tests.metrics_support import metered_worker, scrape, total
from tests.support import free_port, http_json, running_reader, wait_until

pytestmark = pytest.mark.integration

# 20 windows of 500 events warm the item-divergence signal up, 6 more fill its reference and
# Page-Hinkley's minimum; the new cluster of items appears after them.
CHANGE = SynthConfig(
    users=300,
    items=300,
    events=16_000,
    change_at=13_500,
    cluster_items=20,
    cluster_share=0.5,
    affinity_temperature=1.0,
    seed=3,
)
CHUNK = 500
DETECTIONS = (
    "freshrec_drift_detections_total",
    (("detector", "page_hinkley"), ("signal", "item_divergence")),
)


def test_a_new_popular_cluster_is_counted_logged_and_listed_at_drift(
    settings: Settings, tmp_path: Path
) -> None:
    metered = dataclasses.replace(settings, worker_metrics_port=free_port())
    stream = generate(CHANGE)
    change_ts = stream.events[CHANGE.change_at]["ts"]
    with metered_worker(metered, tmp_path / "worker.log") as worker:
        # As live traffic arrives: a chunk at a time, so that no partition runs far ahead of
        # the other (a replay of a whole log at once is read a partition at a time).
        with EventProducer(metered.kafka_bootstrap, metered.events_topic, 100) as producer:
            for start in range(0, len(stream.events), CHUNK):
                producer.send_many(stream.events[start : start + CHUNK])
                producer.flush()
                learned = min(start + CHUNK, len(stream.events))
                wait_until(
                    lambda n=learned: total(scrape(worker), "freshrec_events_total") >= n,
                    60,
                    f"the worker to learn {learned} events",
                    poll_s=0.1,
                )
        with running_reader(metered, tmp_path / "reader.log") as (base, _):

            def counted_and_listed() -> tuple[dict, list[dict]] | None:
                # A firing of the last batch is counted a moment after its events, and listed
                # a Redis write after that: wait for the worker's count and the list to agree.
                status, body = http_json(f"{base}/drift")
                assert status == 200, body
                fired = [
                    f
                    for f in body["firings"]
                    if (f["signal"], f["detector"]) == ("item_divergence", "page_hinkley")
                ]
                samples = scrape(worker)
                counted = samples.get(DETECTIONS, 0.0)
                return (samples, fired) if fired and counted == len(fired) else None

            samples, fired = wait_until(
                counted_and_listed, 30, "item-divergence firings, counted as many as listed"
            )
    assert all(f["ts"] >= change_ts for f in fired), (change_ts, fired)
    assert fired[-1]["after"] > fired[-1]["before"]
    assert ("freshrec_drift_signal_mean", (("signal", "item_divergence"),)) in samples
    assert "drift detected: signal=item_divergence" in (tmp_path / "worker.log").read_text()
