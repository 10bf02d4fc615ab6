"""Freshness under load: how soon an event is in the list served and in the list published.

A figure of events per second says how much the pipeline takes; it does not say how long one
event waits before a user sees its effect. This bench runs the soak's pipeline (a real worker
and reader, a producer process, an open-loop serving load: `freshrec.bench.soak`), measures
the maximum sustained ingest rate under that serving load (paced holds below the rate a
backlog drains at: `freshrec.bench.soak.SustainedSearch`), then holds ``SHARES`` of it in turn.
At each share a *tracer* process sends ``tracers_per_s`` tracer events into the same events
topic: each a click by a user of its own (``tracer-<share>-<n>``, so nothing else touches that
user) on a distinct item, stamped with the wall clock as it is sent. Per tracer it measures,
from the moment it handed the event to the producer (``time.monotonic``, one clock for every
end of every figure):

- *served*: until the first answer of ``GET /recommendations/{user}`` whose ``latest_event_ts``
  is the tracer's own time. Each tracer is polled on a keep-alive connection of its own every
  ``POLL_S`` (or ``POLL_SHARE`` of its age, once that is longer, so a slow tracer does not
  flood the reader), and a poll waits for the last one's answer, so the figure is late by at
  most one interval or one round trip, whichever is longer (both reported);
- *published*: until a consumer of ``freshrec.recommendations`` (a thread of the tracer
  process) receives the first list for that user. Only the worker's learning of the tracer
  marks that user for publication, so their first list reflects it.

A tracer not seen within ``DEADLINE_S`` is counted as missing, not as a time. Each share
starts from a drained pipeline (every event learned, the impressions caught up on, every list
due published) and its tracers start ``settle_s`` after the rate changes.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from freshrec.bench.ingest import process_cpu_seconds, worker_samples
from freshrec.bench.serve import latency_figures
from freshrec.bench.soak import (
    SYNTH_ITEMS,
    Pipeline,
    SustainedSearch,
    compact_append_only_files,
    holds_text,
    load_average_now,
    redis_forks,
    running_pipeline,
    window_latency,
)
from freshrec.connections import kafka_config
from freshrec.devenv.processes import wait_for
from freshrec.progress import Say
from freshrec.settings import Settings

SHARES = (0.5, 0.8)
"""Shares of the measured maximum ingest rate held while tracers run."""
TRACERS_PER_S = 3.0
POLL_S = 0.01
"""How often a tracer's list is asked for while it is young: small next to the figures."""
POLL_SHARE = 0.05
"""Past ``POLL_S / POLL_SHARE`` (0.2 s) of age, a tracer is polled every 5 % of its age."""
DEADLINE_S = 60.0
"""A tracer not served (or published) this long after it was sent counts as missing."""
SETTLE_S = 5.0
"""After the rate changes, how long before the first tracer (the worker's batches settle)."""
SAMPLE_S = 2.0
TARGET_SHARE = 0.5
TARGET_SERVED_P99_MS = 250.0
"""At ``TARGET_SHARE`` of the maximum, event to served list, p99."""


def run_freshness(
    base: Settings,
    seconds: float = 40.0,
    probe_s: float = 25.0,
    serve_rps: float = 100.0,
    shares: tuple[float, ...] = SHARES,
    tracers_per_s: float = TRACERS_PER_S,
    probe_backlog: int = 20_000,
    settle_s: float = SETTLE_S,
    show_progress: bool = True,
    search: SustainedSearch | None = None,
) -> dict[str, Any]:
    """Measure the maximum ingest rate, then event-to-served and event-to-published times at
    each of ``shares`` of it, ``seconds`` of tracers each, under ``serve_rps`` of requests."""
    if seconds <= 0 or probe_s <= 0 or tracers_per_s <= 0 or not shares:
        raise ValueError("seconds, probe_s and tracers_per_s must be > 0, with a share or more")
    if not all(0 < share <= 1 for share in shares):
        raise ValueError(f"shares of the maximum must lie in (0, 1], got {shares}")
    say = Say(show_progress)
    load_average = {"start": load_average_now()}
    with running_pipeline(base, "freshness", serve_rps, probe_backlog, say) as run:
        probe = run.measure_maximum(probe_s, SAMPLE_S * 2.5, search)
        levels = []
        for share in shares:
            # Each share starts from a learned, published state, not the last one's, and with
            # Redis's append-only file just rewritten (`compact_append_only_files`).
            impressions_waiting = run.drain()
            compacted_s = compact_append_only_files(run.watch.store)
            maximum = probe["max_events_per_s"]
            level = _level(run, share, maximum, seconds, tracers_per_s, settle_s)
            levels.append(
                {
                    **level,
                    "impressions_waiting_at_start": impressions_waiting,
                    "append_only_file_rewritten_s": compacted_s,
                }
            )
        requests = run.stop_load()
        load_average["end"] = load_average_now()
    for level in levels:
        level["serving"] = window_latency(
            requests["latencies"], level.pop("since"), level.pop("until")
        )
    tracer = {
        "per_s": tracers_per_s,
        "seconds_per_share": seconds,
        "poll_s": POLL_S,
        "poll_share_of_age": POLL_SHARE,
        "deadline_s": DEADLINE_S,
        "settle_s": settle_s,
    }
    return _summarise(run.settings, probe, levels, serve_rps, tracer, load_average)


def _level(
    run: Pipeline,
    share: float,
    maximum: float,
    seconds: float,
    per_s: float,
    settle_s: float,
) -> dict[str, Any]:
    """Hold ``share`` of ``maximum`` and follow tracers for ``seconds`` after ``settle_s``;
    their times and what the worker did meanwhile."""
    label = f"fresh {share:.0%}"
    rate = share * maximum
    run.say(
        f"freshness: holding {rate:,.0f} events/s ({share:.0%} of the maximum); "
        f"{round(seconds * per_s)} tracers over {seconds:g} s after {settle_s:g} s to settle"
    )
    run.pace(rate)
    paced = time.monotonic()
    ready, go = run.context.Event(), run.context.Event()
    out = run.context.Queue()
    tracer = run.context.Process(
        target=_trace,
        args=(run.settings, run.base_url, f"tracer-{share * 100:.0f}-", per_s, seconds),
        kwargs={"ready": ready, "go": go, "out": out},
        name="tracer",
        daemon=True,
    )
    tracer.start()
    watch = run.watch

    def tracer_alive() -> None:
        watch.alive()
        if tracer.exitcode is not None:
            raise RuntimeError(f"the bench's tracer process exited with code {tracer.exitcode}")

    try:
        wait_for(ready.is_set, 120, "the tracer process to start", check=tracer_alive)
        time.sleep(max(0.0, paced + settle_s - time.monotonic()))  # pacing, not waiting on work
        first = watch.sample(label)
        pids = {"worker": watch.worker_pid, "reader": watch.reader_pid}
        if watch.redis_pid is not None:
            pids["redis"] = watch.redis_pid
        cpu = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        worker_before = _worker_view(run.settings.worker_metrics_port)
        forks_before = redis_forks(watch.store)
        since, begin = time.time(), time.monotonic()
        go.set()
        next_sample = begin + SAMPLE_S
        while True:
            try:
                followed = out.get(timeout=0.2)
                break
            except queue.Empty:
                tracer_alive()
            now = time.monotonic()
            if now > begin + seconds + DEADLINE_S + 60:
                raise TimeoutError(f"the tracer gave no figures {now - begin:.0f} s after it began")
            if now >= next_sample:
                watch.sample(label)
                next_sample += SAMPLE_S
        last = watch.sample(label)
        elapsed = time.monotonic() - begin
        worker = _worker_split(
            worker_before, _worker_view(run.settings.worker_metrics_port), elapsed
        )
        forks = redis_forks(watch.store) - forks_before
        for name, pid in pids.items():
            before, after = cpu[name], process_cpu_seconds(pid)
            cpu[name] = None if before is None or after is None else (after - before) / elapsed
        tracer.join(30)
    finally:
        if tracer.is_alive():
            tracer.kill()
    held = [s for s in watch.samples if s["phase"] == label]
    return {
        "share": share,
        "target_events_per_s": round(rate, 1),
        "produced_events_per_s": round((last["produced"] - first["produced"]) / elapsed, 1),
        "applied_events_per_s": round((last["applied"] - first["applied"]) / elapsed, 1),
        "lag_events": _start_end_max(held, "lag"),
        "unpublished_users": _start_end_max(held, "unpublished"),
        "lists_published_per_s": round(followed["lists"] / elapsed, 1),
        "cpu_cores": {name: None if c is None else round(c, 2) for name, c in cpu.items()},
        "redis_forks": forks,
        "worker": worker,
        "seconds": round(elapsed, 1),
        **_tracer_figures(followed, elapsed),
        "since": since,
        "until": since + elapsed,
    }


def _worker_view(port: int) -> dict[str, Any]:
    """The worker's own counters (cumulative): its event batches, their apply time, and its
    histogram of the time from an event's arrival in Kafka to its batch landing in Redis."""
    view: dict[str, Any] = {"batches": 0.0, "apply_s": 0.0, "events": 0.0, "buckets": {}}
    for sample in worker_samples(port):
        if sample.name == "freshrec_event_to_state_seconds_bucket":
            view["buckets"][float(sample.labels["le"])] = sample.value
        elif sample.name == "freshrec_batches_total":
            view["batches"] = sample.value
        elif sample.name == "freshrec_batch_apply_seconds_sum":
            view["apply_s"] = sample.value
        elif sample.name == "freshrec_events_total":
            view["events"] += sample.value
    return view


def _worker_split(before: dict[str, Any], after: dict[str, Any], elapsed: float) -> dict[str, Any]:
    """What the worker did in a window: batches a second, events per batch, the share of the
    window spent applying them, and Kafka-to-Redis p50/p99 (ms) of the messages it learned,
    interpolated in the histogram's buckets as Prometheus's ``histogram_quantile`` does."""
    batches = after["batches"] - before["batches"]
    bounds = sorted(after["buckets"])
    counts = [after["buckets"][b] - before["buckets"].get(b, 0.0) for b in bounds]

    def quantile(q: float) -> float | None:
        if not counts or counts[-1] <= 0:
            return None
        rank, lower, below = q * counts[-1], 0.0, 0.0
        for bound, cumulative in zip(bounds, counts, strict=True):
            if cumulative >= rank:
                if bound == float("inf"):
                    return lower * 1000.0  # past the last finite bucket: at least that
                share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
                return round((lower + (bound - lower) * share) * 1000.0, 1)
            lower, below = bound, cumulative
        return None

    return {
        "batches_per_s": round(batches / elapsed, 1),
        "events_per_batch": round((after["events"] - before["events"]) / batches, 1)
        if batches
        else None,
        "applying_share": round((after["apply_s"] - before["apply_s"]) / elapsed, 3),
        "kafka_to_redis_p50_ms": quantile(0.5),
        "kafka_to_redis_p99_ms": quantile(0.99),
    }


def _start_end_max(samples: list[dict[str, Any]], field: str) -> dict[str, int]:
    return {
        "start": samples[0][field],
        "end": samples[-1][field],
        "max": max(s[field] for s in samples),
    }


def _tracer_figures(followed: dict[str, Any], elapsed: float) -> dict[str, Any]:
    tracers = followed["tracers"]

    def figures(field: str) -> dict[str, Any]:
        seen = np.array([t[field] for t in tracers if t[field] is not None]) * 1000.0
        return {
            "tracers": len(tracers),
            "seen": len(seen),
            "missing": len(tracers) - len(seen),
            **(latency_figures(seen) if len(seen) else {}),
        }

    trips = np.array(followed["round_trips"]) * 1000.0
    return {
        "served": figures("served_s"),
        "published": figures("published_s"),
        "generated": figures("generated_s"),
        "polls": {
            "requests": len(trips),
            "per_s": round(len(trips) / elapsed, 1),
            "errors": sum(t["errors"] for t in tracers),
            "round_trip_p50_ms": round(float(np.median(trips)), 3) if len(trips) else None,
        },
    }


# --- the tracer process ----------------------------------------------------------------------
def _trace(
    settings: Settings,
    base_url: str,
    prefix: str,
    per_s: float,
    seconds: float,
    *,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    """Runs in its own process: tracer events sent and followed, their times put on ``out``.

    It sets ``ready`` once its consumer reads the recommendations topic, and starts on ``go``."""
    import uvloop

    from freshrec.streams.producer import EventProducer

    producer = EventProducer(
        settings.kafka_bootstrap,
        settings.events_topic,
        1,
        kafka_config(settings, **{"linger.ms": 0}),  # a tracer leaves at once
    )
    published = _PublishedLists(settings, prefix)
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    follow = _Tracers(producer, published.arrived, host, int(port), prefix)
    try:
        ready.set()
        if not go.wait(600):
            raise TimeoutError("the tracer was never told to start")
        lists_before = published.lists
        result = uvloop.run(follow.run(per_s, seconds))
        result["lists"] = published.lists - lists_before
    finally:
        published.close()
        producer.flush()
    out.put(result)


class _PublishedLists:
    """Every list published from now on, read by a thread of its own: how many, and for each
    tracer user when their first list arrived (``time.monotonic``) and the reader's
    ``generated_at`` in it.

    The partitions are assigned at their end offsets read here, not at "latest" resolved on
    some later fetch, so nothing published after the constructor returns is missed; no
    consumer group is joined or left behind."""

    def __init__(self, settings: Settings, prefix: str) -> None:
        from confluent_kafka import Consumer, TopicPartition

        topic = settings.recommendations_topic
        self.consumer = Consumer(
            kafka_config(
                settings,
                **{"group.id": f"{settings.topic_prefix}-tracer", "enable.auto.commit": False},
                log_level=3,
            )
        )
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = [
            TopicPartition(
                topic,
                p,
                self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1],
            )
            for p in partitions
        ]
        self.consumer.assign(ends)
        self.prefix = prefix.encode()
        self.arrived: dict[str, tuple[float, float]] = {}
        self.lists = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="published lists", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            message = self.consumer.poll(0.05)  # returns as soon as a message is there
            if message is None or message.error() is not None:
                continue
            arrived = time.monotonic()
            self.lists += 1
            key = message.key() or b""
            if key.startswith(self.prefix) and key.decode() not in self.arrived:
                generated_at = json.loads(message.value())["generated_at"]
                self.arrived[key.decode()] = (arrived, generated_at)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


@dataclass
class _Tracers:
    """Sends tracer events on schedule and follows each to its served and published list."""

    producer: Any  # an EventProducer of one event per message
    published: dict[str, tuple[float, float]]  # filled by the consumer thread
    host: str
    port: int  # the reader's
    prefix: str  # of the tracers' user ids
    round_trips: list[float] = field(default_factory=list)  # of every poll, s

    def send(self, user: str, item: str) -> tuple[float, float]:
        """A click by ``user`` on ``item``; its event time (wall clock) and when it was sent."""
        ts = time.time()
        sent = time.monotonic()
        self.producer.send(
            {
                "event_id": f"{user}-click",
                "type": "click",
                "user_id": user,
                "item_id": item,
                "ts": ts,
            }
        )
        return ts, sent

    async def run(self, per_s: float, seconds: float) -> dict[str, Any]:
        begin = time.monotonic()
        tasks = []
        for n in range(max(1, round(seconds * per_s))):
            delay = begin + n / per_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self.follow(n)))
        return {"tracers": await asyncio.gather(*tasks), "round_trips": self.round_trips}

    async def follow(self, n: int) -> dict[str, Any]:
        user = f"{self.prefix}{n}"
        ts, sent = self.send(user, f"i{n % SYNTH_ITEMS}")
        served, errors = await self._served(user, ts, sent)
        while user not in self.published and time.monotonic() < sent + DEADLINE_S:
            await asyncio.sleep(0.01)  # the consumer thread stamps the arrival itself
        arrived = self.published.get(user)
        in_time = arrived is not None and arrived[0] - sent <= DEADLINE_S
        return {
            "served_s": served,
            "published_s": arrived[0] - sent if in_time else None,
            "generated_s": arrived[1] - ts if in_time else None,
            "errors": errors,
        }

    async def _served(self, user: str, ts: float, sent: float) -> tuple[float | None, int]:
        """Seconds from ``sent`` to the first answer for ``user`` showing the event at ``ts``
        (None past the deadline), and how many polls failed."""
        request = f"GET /recommendations/{user}?k=10 HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        errors = 0
        try:
            while True:
                asked = time.monotonic()
                try:
                    if connection is None:
                        connection = await asyncio.open_connection(self.host, self.port)
                    status, body = await _ask(*connection, request)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    status, body = 0, b""
                    if connection is not None:
                        connection[1].close()
                    connection = None
                answered = time.monotonic()
                self.round_trips.append(answered - asked)
                if status == 200:
                    latest = json.loads(body)["latest_event_ts"]
                    if latest is not None and abs(latest - ts) < 1e-3:
                        return answered - sent, errors
                else:
                    errors += 1
                age = answered - sent
                if age >= DEADLINE_S:
                    return None, errors
                interval = max(POLL_S, POLL_SHARE * age)
                await asyncio.sleep(max(0.0, asked + interval - time.monotonic()))
        finally:
            if connection is not None:
                connection[1].close()


async def _ask(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes]:
    """One request on a keep-alive connection: the answer's status and body."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(head[9:12]), await reader.readexactly(int(value))
    raise ValueError("an answer without Content-Length")


# --- results ---------------------------------------------------------------------------------
def _summarise(
    settings: Settings,
    probe: dict[str, Any],
    levels: list[dict[str, Any]],
    serve_rps: float,
    tracer: dict[str, Any],
    load_average: dict[str, Any],
) -> dict[str, Any]:
    at_target = next((lv for lv in levels if lv["share"] == TARGET_SHARE), None)
    p99 = None if at_target is None else at_target["served"].get("p99_ms")
    complete = at_target is not None and at_target["served"]["missing"] == 0
    return {
        "max_events_per_s": probe["max_events_per_s"],
        "probe": probe,
        "levels": levels,
        "target": {
            "share": TARGET_SHARE,
            "served_p99_ms": TARGET_SERVED_P99_MS,
            "measured_p99_ms": p99,
            "met": None if p99 is None else complete and p99 <= TARGET_SERVED_P99_MS,
        },
        "tracer": tracer,
        "serve_rps": serve_rps,
        "load_average": load_average,
        "setup": {
            "cpus": os.cpu_count(),
            "partitions": settings.partitions,
            "batch_size": settings.batch_size,
            "batch_within_s": settings.batch_within_s,
            "publish_interval_s": settings.publish_interval_s,
            "topic_prefix": settings.topic_prefix,
            "key_prefix": settings.key_prefix,
        },
    }


def format_freshness(results: dict[str, Any]) -> str:
    """One row per share of the maximum: the worker's rates, then served and published times."""
    t, setup, load = results["tracer"], results["setup"], results["load_average"]
    probe = results["probe"]
    lines = [
        f"freshness under load: maximum sustained ingest {results['max_events_per_s']:,.0f} "
        f"events/s ({holds_text(probe)}), serving {results['serve_rps']:,.0f} req/s throughout; "
        f"{setup['cpus']} CPUs; load average {load.get('start')} at the start, "
        f"{load.get('end')} at the end",
        f"tracers: {t['per_s']:g}/s for {t['seconds_per_share']:g} s per load, each a user of "
        f"its own; served list polled every {1000 * t['poll_s']:g} ms (every "
        f"{t['poll_share_of_age']:.0%} of its age past {t['poll_s'] / t['poll_share_of_age']:g} "
        f"s); lists published {setup['publish_interval_s']:g} s after a user's first touch "
        f"(FRESHREC_PUBLISH_INTERVAL_S); missing: not seen in {t['deadline_s']:g} s",
        "",
        f"{'load':>5} {'events/s':>9} {'learned':>8} {'lag max':>8} {'unpublished':>11} "
        f"{'tracers':>7}  "
        f"{'served p50':>10} {'p99':>7} {'max':>7} {'miss':>4}  "
        f"{'published p50':>13} {'p99':>7} {'max':>7} {'miss':>4}  "
        f"{'requests p50/p99':>16}",
    ]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    for lv in results["levels"]:
        s, p, r = lv["served"], lv["published"], lv["serving"]
        lines.append(
            f"{lv['share']:>5.0%} {lv['target_events_per_s']:>9,.0f} "
            f"{lv['applied_events_per_s']:>8,.0f} {lv['lag_events']['max']:>8,} "
            f"{lv['unpublished_users']['max']:>11,} {s['tracers']:>7}  "
            f"{ms(s.get('p50_ms')):>10} {ms(s.get('p99_ms')):>7} "
            f"{ms(s.get('max_ms')):>7} {s['missing']:>4}  {ms(p.get('p50_ms')):>13} "
            f"{ms(p.get('p99_ms')):>7} {ms(p.get('max_ms')):>7} {p['missing']:>4}  "
            f"{ms(r.get('p50_ms')) + '/' + ms(r.get('p99_ms')):>16}"
        )
    target = results["target"]
    verdict = {True: "met", False: "not met", None: "not measured"}[target["met"]]
    lines.append(
        "(times in ms from the tracer event handed to the producer; lag: events sent and not "
        "learned; unpublished: users whose list is due or waiting to be published; requests: "
        "the serving load's latency in the same window)"
    )
    for lv in results["levels"]:
        cpu, polls = lv["cpu_cores"], lv["polls"]
        lines.append(
            f"at {lv['share']:.0%}: CPU cores: worker {cpu['worker']}, reader {cpu['reader']}, "
            f"redis-server {cpu.get('redis', '-')}; "
            f"{lv['lists_published_per_s']:,.0f} lists published/s; tracer polls "
            f"{polls['per_s']:,.0f}/s, round trip p50 {polls['round_trip_p50_ms']} ms; "
            f"Redis forked {lv['redis_forks']} times (append-only file rewritten "
            + (
                "before: refused"
                if lv["append_only_file_rewritten_s"] is None
                else f"in {lv['append_only_file_rewritten_s']} s before"
            )
            + ")"
        )
        worker = lv.get("worker")
        if worker:
            lines.append(
                f"at {lv['share']:.0%}: worker {worker['batches_per_s']:,.1f} event batches/s of "
                f"{worker['events_per_batch']} events, applying {worker['applying_share']:.0%} "
                f"of the time; Kafka to Redis p50 {ms(worker['kafka_to_redis_p50_ms'])} ms, "
                f"p99 {ms(worker['kafka_to_redis_p99_ms'])} ms (its histogram, every message)"
            )
    lines += [
        f"target: event to served list p99 <= {target['served_p99_ms']:g} ms at "
        f"{target['share']:.0%} of the maximum: {verdict}"
        + ("" if target["measured_p99_ms"] is None else f" ({target['measured_p99_ms']:,.0f} ms)"),
    ]
    return "\n".join(lines)
