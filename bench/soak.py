"""``freshrec bench --soak``: the whole pipeline held at 70 % of its maximum, watched for growth.

A benchmark of minutes says how fast; a soak says whether it stays that way. One run starts a
real worker and a real reader (as ``freshrec demo`` does, on the configured or local Kafka and
Redis, under prefixes of its own) and, from two processes of its own, a producer of synthetic
events and an open-loop serving load. Then:

1. *probe*: the producer sends as fast as the worker takes events (a backlog of at most
   ``probe_backlog`` events, so the worker is always busy and the backlog drains in seconds),
   and the worker's own count of events learned (``freshrec_events_total``) gives the rate a
   backlog drains at, from its first batch landing to its last in the window;
2. *search*: paced holds bisect below that drain rate for the maximum sustained ingest rate,
   the highest the worker keeps up with (`_sustained`: a paced stream comes in smaller
   batches than a backlog, which cost more per event);
3. *drain*: the producer pauses until the worker has learned everything;
4. *hold*: the producer paces ``HOLD_SHARE`` of that maximum for ``seconds``.

The serving load (``GET /recommendations/{user}`` for random users of the stream) runs through
the probe, the search and the hold, so the maximum is measured under the load that is then
held. Every ``sample_s`` the run records the RSS of the worker, the reader and redis-server,
Redis's ``used_memory``, the lag (events produced minus events learned) and the reader's
errors. A lag that grows through the hold, or any 5xx or unanswered request, fails the run.

`running_pipeline` (the processes, the probe, pacing and draining) is shared with the freshness
bench (`freshrec.bench.freshness`), which holds other shares of the same maximum.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis.cluster import RedisCluster

from freshrec.bench.ingest import (
    delete_group,
    process_cpu_seconds,
    scrape_worker,
    worker_samples,
)
from freshrec.bench.serve import (
    CLIENT_ERRORS,
    REQUEST_TIMEOUT_S,
    KeepAliveClient,
    latency_figures,
)
from freshrec.connections import kafka_config, redis_sync_client
from freshrec.devenv.isolated_run import isolated_run
from freshrec.devenv.processes import (
    Children,
    free_port,
    group_is_consuming,
    http_json,
    wait_for,
)
from freshrec.progress import Say
from freshrec.serving.kernels import warm_up
from freshrec.settings import Settings, mask_url
from freshrec.store.keys import Keys

HOLD_SHARE = 0.7
"""Share of the measured maximum that the hold paces."""
LAG_FLOOR_S = 5.0
"""A lag below this many seconds of the held rate is a worker keeping up, whatever its trend."""
LAG_BOUND_S = 30.0
"""A lag above this many seconds of the held rate at the end is a worker that fell behind."""
SYNTH_USERS = 10_000
SYNTH_ITEMS = 2_000
SYNTH_EVENTS = 100_000
SYNTH_SEED = 7
EVENTS_PER_MESSAGE = 100
SEND_CHUNK = 500  # events the producer sends between looks at its mode and the clock
FLUSH_S = 0.2  # the producer's longest hold on a partly filled array (as linger would)

# The producer's modes, set by the bench through a shared value.
PAUSE, FAST, PACED, STOP = range(4)
# The load generator's shared counters.
SENT, OK, CLIENT_ERROR, SERVER_ERROR, NO_ANSWER = range(5)


@dataclass(frozen=True)
class SustainedSearch:
    """How `_sustained` bisects below the drain rate: ``steps`` paced holds, each ``settle_s``
    to reach its batch size and then ``hold_s`` of lag samples every ``sample_s``. A hold is
    kept up with when the lag's least-squares slope is at most ``slope_share`` of the rate per
    second, or the lag never passes ``floor_s`` of the rate (batches in flight, not a
    backlog)."""

    steps: int = 4
    settle_s: float = 5.0
    hold_s: float = 15.0
    sample_s: float = 0.5
    slope_share: float = 0.03
    floor_s: float = 0.5

    def __post_init__(self) -> None:
        if self.steps < 1 or self.settle_s < 0 or not 0 < self.sample_s <= self.hold_s:
            raise ValueError(
                "a search takes a step or more, a settle of 0 s or more and a hold of at least "
                f"one sample: {self}"
            )


@dataclass
class _Shared:
    """What the bench and its two helper processes share."""

    mode: Any  # multiprocessing.Value("i"): PAUSE, FAST, PACED or STOP
    rate: Any  # Value("d"): events/s in PACED
    backlog: Any  # Value("q"): FAST keeps at most this many events unlearned
    produced: Any  # Value("q"): events handed to Kafka
    applied: Any  # Value("q"): events the worker has learned, as the bench last read them
    ready: Any  # Value("i"): 1 once the producer has its stream and its connection
    requests: Any  # Array("q", 5): SENT, OK, CLIENT_ERROR, SERVER_ERROR, NO_ANSWER
    stop_load: Any  # Event


def run_soak(
    base: Settings,
    seconds: float = 600.0,
    probe_s: float = 25.0,
    sample_s: float = 10.0,
    serve_rps: float = 100.0,
    probe_backlog: int = 20_000,
    show_progress: bool = True,
    search: SustainedSearch | None = None,
) -> dict[str, Any]:
    """Find the maximum sustained ingest rate, hold ``HOLD_SHARE`` of it for ``seconds``; every
    figure, every sample and the verdict (``ok``, ``failures``)."""
    if seconds <= 0 or probe_s <= 0 or sample_s <= 0:
        raise ValueError("seconds, probe_s and sample_s must be > 0")
    say = Say(show_progress)
    load_average = {"start": load_average_now()}
    with running_pipeline(base, "soak", serve_rps, probe_backlog, say) as run:
        probe = run.measure_maximum(probe_s, sample_s, search)
        held_rate = HOLD_SHARE * probe["max_events_per_s"]
        run.drain()
        say(
            f"soak: holding {held_rate:,.0f} events/s ({HOLD_SHARE:.0%} of the maximum) "
            f"for {seconds:,.0f} s, a sample every {sample_s:g} s"
        )
        hold_since = time.time()
        hold = _hold(run.watch, run.shared, held_rate, seconds, sample_s, say)
        requests = run.stop_load()
        load_average["end"] = load_average_now()
    held = window_latency(requests["latencies"], hold_since)
    serving = {
        "requests": requests["requests"],
        "achieved_rps": requests["achieved_rps"],
        "hold_requests": held.pop("requests"),
        **held,
    }
    return _summarise(
        run.settings, run.watch.samples, probe, hold, serving, serve_rps, load_average, seconds
    )


@dataclass
class Pipeline:
    """A running worker and reader fed by the producer process and asked by the load process.

    What `running_pipeline` yields; the soak and the freshness bench drive it."""

    settings: Settings
    shared: _Shared
    watch: _Watch
    base_url: str
    serve_rps: float
    say: Say
    label: str  # starts its progress lines
    results: Any  # the load process's queue
    context: Any  # the spawn context, for more processes of the bench (the tracer)

    def measure_maximum(
        self, probe_s: float, sample_s: float, search: SustainedSearch | None = None
    ) -> dict[str, Any]:
        """The worker's maximum sustained ingest rate under the serving load: `_probe`'s drain
        rate bounds it from above, `_sustained` finds it below by paced holds. The probe's
        figures, ``drain_events_per_s``, ``max_events_per_s`` (the sustained rate) and the
        holds."""
        probe = _probe(self.watch, self.shared, probe_s, sample_s, self.say, self.label)
        self.watch.learn_backlog()
        found = _sustained(
            self.watch, self.shared, probe["drain_events_per_s"], search or SustainedSearch(),
            self.say, self.label,
        )  # fmt: skip
        return {**probe, **found}

    def pace(self, rate: float) -> None:
        """The producer sends ``rate`` events/s from now on."""
        self.shared.rate.value = rate
        self.shared.mode.value = PACED

    def drain(self) -> float:
        """Pause the producer until the worker has learned every event sent and caught up on
        the impressions (the serving load goes on logging them, so within a second's worth),
        the reader has published every list due, and the requests held up meanwhile are
        answered (or given up on); returns the impression messages the worker last reported
        waiting. A backlog of impressions left by the phase before would otherwise be learned
        in the next one, beside the events it measures."""
        self.watch.learn_backlog()
        since, waiting = time.monotonic(), float("inf")

        def impressions_learned() -> bool:
            nonlocal waiting
            waiting = self.watch.impressions_waiting(since)
            return waiting <= self.serve_rps

        self.watch.wait(impressions_learned, 300, "the worker to learn the impressions waiting")
        self.watch.wait(
            lambda: self.watch.unpublished() == 0, 300, "the reader to publish the lists due"
        )
        self.watch.wait(
            lambda: self.watch.in_flight() < self.serve_rps,
            120,
            "the reader to catch up on requests",
        )
        return waiting

    def stop_load(self) -> dict[str, Any]:
        """Stop the serving load; its counts and every request's (due wall clock, latency s)."""
        self.shared.stop_load.set()
        return self.results.get(timeout=120)


@contextmanager
def running_pipeline(
    base: Settings, label: str, serve_rps: float, probe_backlog: int, say: Say
) -> Iterator[Pipeline]:
    """A worker, a reader, the producer (paused) and the serving load (running) on the
    configured or local services, under prefixes of their own; all stopped and erased after,
    the logs kept when the run raised. ``label`` starts its progress lines and names its run."""
    if serve_rps <= 0 or probe_backlog < 1:
        raise ValueError("serve_rps and probe_backlog must be > 0")
    context = multiprocessing.get_context("spawn")
    shared = _Shared(
        mode=context.Value("i", PAUSE),
        rate=context.Value("d", 0.0),
        backlog=context.Value("q", probe_backlog),
        produced=context.Value("q", 0),
        applied=context.Value("q", 0),
        ready=context.Value("i", 0),
        requests=context.Array("q", 5),
        stop_load=context.Event(),
    )
    with isolated_run(
        base,
        f"bench-{label}",
        serve_port=free_port(),
        worker_metrics_port=free_port(),
        serve_host="127.0.0.1",
    ) as settings:
        from confluent_kafka.admin import AdminClient

        workdir = Path(tempfile.mkdtemp(prefix=f"freshrec-{label}-"))
        children = Children(workdir, settings)
        store = redis_sync_client(settings)
        admin = AdminClient(kafka_config(settings, log_level=3))
        group = f"{settings.topic_prefix}-worker"  # the worker's app id is its group id
        helpers: list[multiprocessing.process.BaseProcess] = []
        results: Any = context.Queue()
        succeeded = False  # the logs stay for a run that raised
        try:
            say(
                f"{label}: Kafka {settings.kafka_bootstrap}, Redis "
                f"{mask_url(settings.redis_url)}; logs in {workdir}"
            )
            say(f"{label}: {warm_up([settings.funnel_config()])}")
            worker = children.start("worker", ["worker", "--loglevel", "warning"], cwd=workdir)
            reader = children.start("reader", ["serve"])
            base_url = f"http://{settings.serve_host}:{settings.serve_port}"
            children.wait(lambda: http_json(f"{base_url}/healthz")[0] == 200, 120, "the reader")
            children.wait(
                partial(group_is_consuming, settings.kafka_bootstrap, group, admin, settings),
                120,
                "the worker to join its consumer group",
            )
            producer = context.Process(
                target=_produce, args=(settings, shared), name="producer", daemon=True
            )
            load = context.Process(
                target=_serve_load,
                args=(base_url, SYNTH_USERS, serve_rps, shared, results),
                name="serving load",
                daemon=True,
            )
            helpers += [producer, load]
            producer.start()
            watch = _Watch(settings, store, children, helpers, shared, worker.pid, reader.pid)
            watch.wait(
                lambda: shared.ready.value,
                300,
                f"the producer's {SYNTH_EVENTS:,}-event synthetic stream",
            )
            load.start()
            watch.sample("idle")
            say(
                f"{label}: worker pid {worker.pid}, reader pid {reader.pid}, "
                f"redis-server pid {watch.redis_pid or '(not on this machine)'}; "
                f"serving {serve_rps:,.0f} req/s"
            )
            yield Pipeline(
                settings, shared, watch, base_url, serve_rps, say, label, results, context
            )
            succeeded = True
        finally:
            shared.mode.value = STOP
            shared.stop_load.set()
            for helper in helpers:
                if helper.pid is not None:
                    helper.join(30)
                    if helper.is_alive():
                        helper.kill()
            children.stop()
            try:
                delete_group(admin, group, timeout_s=30)
            finally:
                # Let librdkafka's client go now: kept by this frame, it would go on reconnecting
                # (and logging so) to the broker the isolated run stops next.
                del admin
                store.close()
                if succeeded:
                    shutil.rmtree(workdir, ignore_errors=True)


class _Watch:
    """The run's probes: progress from the worker's metrics, memory from /proc and INFO."""

    def __init__(
        self,
        settings: Settings,
        store: redis.Redis,
        children: Children,
        helpers: list[multiprocessing.process.BaseProcess],
        shared: _Shared,
        worker_pid: int,
        reader_pid: int,
    ) -> None:
        self.settings = settings
        self.store = store
        self.children = children
        self.helpers = helpers
        self.shared = shared
        self.worker_pid = worker_pid
        self.reader_pid = reader_pid
        self.redis_pid = _local_redis_pid(store)
        self.dirty_users = Keys(settings.key_prefix).dirty_users
        self.started = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self._applied = 0

    def alive(self) -> None:
        """Raise, naming the process, if one the run depends on has exited."""
        self.children.check()
        for helper in self.helpers:
            if helper.exitcode is not None:
                raise RuntimeError(
                    f"the bench's {helper.name} process exited with code {helper.exitcode}"
                )

    def wait(self, condition: Callable[[], Any], timeout_s: float, what: str) -> None:
        """`wait_for` that stops at once when a process the run depends on has exited."""
        wait_for(condition, timeout_s, f"{what}; logs in {self.children.logs}", check=self.alive)

    def applied(self) -> int:
        """Events the worker has learned from the events topic (impressions are not counted).

        The last count read stands in while its /metrics does not answer."""
        metrics = scrape_worker(self.settings.worker_metrics_port)
        if "freshrec_events_total" in metrics:
            self._applied = int(metrics["freshrec_events_total"])
            self.shared.applied.value = self._applied  # the producer's backlog in the probe
        return self._applied

    def impressions_waiting(self, since: float) -> float:
        """Impression messages waiting for the worker, as its lag gauge read them at a tick
        after ``since`` (`time.monotonic()`); infinite until it has one."""
        samples = worker_samples(self.settings.worker_metrics_port)
        ages = [s.value for s in samples if s.name == "freshrec_worker_end_offsets_age_seconds"]
        if not ages or time.monotonic() - ages[0] <= since:
            return float("inf")
        return sum(
            s.value
            for s in samples
            if s.name == "freshrec_consumer_lag_messages" and s.labels.get("topic") == "impressions"
        )

    def in_flight(self) -> int:
        """Requests sent and not answered yet (nor given up on)."""
        counts = list(self.shared.requests)
        return counts[SENT] - sum(counts[OK:])

    def lag(self) -> int:
        produced = self.shared.produced.value
        return produced - self.applied()

    def learn_backlog(self) -> None:
        """Pause the producer until the worker has learned every event sent."""
        self.shared.mode.value = PAUSE
        self.wait(lambda: self.lag() <= 0, 300, "the worker to learn the backlog")

    def unpublished(self) -> int:
        """Users whose fresh list the reader has yet to publish."""
        return int(self.store.zcard(self.dirty_users))

    def sample(self, phase: str) -> dict[str, Any]:
        self.alive()
        produced = self.shared.produced.value
        applied = self.applied()
        used = self.store.info("memory")["used_memory"]
        requests = list(self.shared.requests)
        sample = {
            "t_s": round(time.monotonic() - self.started, 1),
            "phase": phase,
            "produced": produced,
            "applied": applied,
            "lag": produced - applied,
            "worker_rss_mib": _rss_mib(self.worker_pid),
            "reader_rss_mib": _rss_mib(self.reader_pid),
            "redis_rss_mib": None if self.redis_pid is None else _rss_mib(self.redis_pid),
            "redis_used_memory_mib": round(used / 2**20, 1),
            "requests": requests[SENT],
            "reader_errors": requests[CLIENT_ERROR] + requests[SERVER_ERROR] + requests[NO_ANSWER],
            "reader_5xx": requests[SERVER_ERROR],
            "no_answer": requests[NO_ANSWER],
            "in_flight": requests[SENT] - sum(requests[OK:]),
            "unpublished": self.unpublished(),
        }
        self.samples.append(sample)
        return sample


def _probe(
    watch: _Watch, shared: _Shared, probe_s: float, sample_s: float, say: Say, label: str
) -> dict[str, Any]:
    """Events as fast as the worker learns them; its rate between batch landings.

    The window runs from the first batch that lands (its start-up is not the steady rate) to
    the last one to land within ``probe_s``, or later if fewer than three landed by then.
    """
    landings: list[tuple[float, int]] = []
    backlogs: list[int] = []
    shared.mode.value = FAST
    started = next_sample = time.monotonic()
    deadline = started + max(probe_s * 4, 120.0)
    while True:
        now = time.monotonic()
        if now >= next_sample:
            watch.sample("probe")
            next_sample += sample_s
        applied = watch.applied()
        backlogs.append(shared.produced.value - applied)
        if applied and (not landings or applied > landings[-1][1]):
            landings.append((now, applied))
        if now - started >= probe_s and len(landings) >= 3:
            break
        if now > deadline:
            raise TimeoutError(
                f"{label}: the worker landed {len(landings)} batches in {now - started:.0f} s; "
                "at least 3 are needed to measure its rate"
            )
        watch.alive()
        time.sleep(0.1)
    (t0, a0), (t1, a1) = landings[0], landings[-1]
    rate = (a1 - a0) / (t1 - t0)
    say(
        f"{label}: a backlog drains at {rate:,.0f} events/s ({a1 - a0:,} events in "
        f"{len(landings) - 1} batches over {t1 - t0:.1f} s; mean backlog "
        f"{statistics.fmean(backlogs):,.0f} of at most {shared.backlog.value:,})"
    )
    return {
        "drain_events_per_s": round(rate, 1),
        "seconds": round(t1 - t0, 2),
        "events": a1 - a0,
        "batches": len(landings) - 1,
        "backlog_mean": round(statistics.fmean(backlogs)),
        "backlog_cap": shared.backlog.value,
    }


def _sustained(
    watch: _Watch,
    shared: _Shared,
    drain_rate: float,
    search: SustainedSearch,
    say: Say,
    label: str,
) -> dict[str, Any]:
    """The highest paced rate the worker keeps up with: *sustainable throughput*, the most a
    system takes without a backlog that keeps growing (Karimov et al., "Benchmarking
    Distributed Stream Data Processing Systems", ICDE 2018).

    A drained backlog comes in full batches, which cost less per event than the smaller
    batches a paced stream arrives in, so the drain rate is an upper bound, not a rate the
    pipeline holds. Bisects ``(0, drain_rate]`` with ``search.steps`` holds (`_keeps_up`),
    each from an empty backlog; raises when it kept up with none of them.
    """
    low, high = 0.0, drain_rate
    holds = []
    for _ in range(search.steps):
        rate = (low + high) / 2
        hold = _keeps_up(watch, shared, rate, search)
        holds.append(hold)
        say(
            f"{label}: {rate:,.0f} events/s {'held' if hold['kept_up'] else 'not held'} (lag "
            f"{hold['lag_slope_per_s']:+,.0f} events/s, at most {hold['lag_max']:,})"
        )
        low, high = (rate, high) if hold["kept_up"] else (low, rate)
        watch.learn_backlog()
    if not low:
        tried = ", ".join(f"{h['events_per_s']:,.0f}" for h in holds)
        raise RuntimeError(f"{label}: the worker kept up with none of {tried} events/s")
    say(f"{label}: maximum sustained {low:,.0f} events/s ({low / drain_rate:.0%} of the drain)")
    return {"max_events_per_s": round(low, 1), "holds": holds}


def holds_text(probe: dict[str, Any]) -> str:
    """The search in a line: the drain rate and each paced hold, held or not."""
    holds = ", ".join(
        f"{h['events_per_s']:,.0f} {'held' if h['kept_up'] else 'not'}" for h in probe["holds"]
    )
    return (
        f"a backlog drains at {probe['drain_events_per_s']:,.0f}: {probe['events']:,} events in "
        f"{probe['batches']} batches over {probe['seconds']:.1f} s; paced: {holds}"
    )


def _keeps_up(
    watch: _Watch, shared: _Shared, rate: float, search: SustainedSearch
) -> dict[str, Any]:
    """Pace ``rate`` for ``search.settle_s`` then ``search.hold_s``; whether the lag held."""
    shared.rate.value = rate
    shared.mode.value = PACED
    begin = time.monotonic()
    sent = shared.produced.value
    times: list[float] = []
    lags: list[int] = []
    while (now := time.monotonic()) < begin + search.settle_s + search.hold_s:
        if now >= begin + search.settle_s:
            lags.append(watch.lag())
            times.append(now)
        watch.alive()
        time.sleep(search.sample_s)  # pacing: the samples are the measurement
    produced_per_s = (shared.produced.value - sent) / (time.monotonic() - begin)
    slope = float(np.polyfit(times, lags, 1)[0]) if len(lags) > 1 else 0.0
    kept_up = slope <= search.slope_share * rate or max(lags) <= search.floor_s * rate
    return {
        "events_per_s": round(rate, 1),
        "produced_events_per_s": round(produced_per_s, 1),
        "lag_slope_per_s": round(slope, 1),
        "lag_max": max(lags),
        "kept_up": bool(kept_up),
    }


def _hold(
    watch: _Watch, shared: _Shared, rate: float, seconds: float, sample_s: float, say: Say
) -> dict[str, Any]:
    """``rate`` events/s for ``seconds``, sampled every ``sample_s``."""
    shared.rate.value = rate
    shared.mode.value = PACED
    begin = time.monotonic()
    first = watch.sample("hold")
    cpu = {"worker": process_cpu_seconds(watch.worker_pid)}
    cpu["reader"] = process_cpu_seconds(watch.reader_pid)
    ticks = max(1, round(seconds / sample_s))
    for tick in range(1, ticks + 1):
        due = begin + tick * seconds / ticks
        while (left := due - time.monotonic()) > 0:
            time.sleep(min(left, 1.0))  # pacing, with a look at the processes every second
            watch.alive()
        last = watch.sample("hold")
        say(
            f"soak: {last['t_s']:>6.0f} s  lag {last['lag']:>8,}  worker "
            f"{last['worker_rss_mib']:,.0f} MiB  reader {last['reader_rss_mib']:,.0f} MiB  "
            f"redis {last['redis_used_memory_mib']:,.0f} MiB used  "
            f"errors {last['reader_errors']}"
        )
    elapsed = time.monotonic() - begin
    shared.mode.value = PAUSE
    cpu_share = {
        name: None
        if before is None or (after := process_cpu_seconds(pid)) is None
        else round((after - before) / elapsed, 3)
        for (name, before), pid in zip(
            cpu.items(), (watch.worker_pid, watch.reader_pid), strict=True
        )
    }
    return {
        "seconds": round(elapsed, 1),
        "target_events_per_s": round(rate, 1),
        "produced_events_per_s": round((last["produced"] - first["produced"]) / elapsed, 1),
        "applied_events_per_s": round((last["applied"] - first["applied"]) / elapsed, 1),
        "cpu_share": cpu_share,
    }


# --- the helper processes --------------------------------------------------------------------
def _produce(settings: Settings, shared: _Shared) -> None:
    """Runs in its own process: the synthetic stream, cycled, as live traffic.

    Each event is stamped with the wall clock as it is sent (event time advances as it would in
    production, whatever the rate) and its event id with the cycle, so repeats are new events.
    Users and items stay those of the stream: a state that keeps growing over the hold is not
    new users arriving.
    """
    from freshrec.evaluation.synth import SynthConfig, generate
    from freshrec.streams.producer import EventProducer

    stream = generate(
        SynthConfig(events=SYNTH_EVENTS, users=SYNTH_USERS, items=SYNTH_ITEMS, seed=SYNTH_SEED)
    ).events
    producer = EventProducer(
        settings.kafka_bootstrap, settings.events_topic, EVENTS_PER_MESSAGE, kafka_config(settings)
    )
    position = 0  # events taken from the cycled stream (some may wait in a partial array)
    pace: tuple[float, int, float] | None = None  # (since, position then, rate)
    flushed = time.monotonic()
    shared.ready.value = 1

    def send(count: int) -> None:
        nonlocal position
        now = time.time()
        for _ in range(count):
            event = stream[position % SYNTH_EVENTS]
            cycle = position // SYNTH_EVENTS
            producer.send({**event, "event_id": f"{event['event_id']}-{cycle}", "ts": now})
            position += 1
        shared.produced.value = producer.sent_events

    while (mode := shared.mode.value) != STOP:
        now = time.monotonic()
        if mode == PACED:
            rate = shared.rate.value
            if pace is None or pace[2] != rate:
                pace = (now, position, rate)
            due = pace[1] + int((now - pace[0]) * rate)
            if due > position:
                send(min(due - position, SEND_CHUNK))
            else:
                time.sleep(0.002)
        else:
            pace = None
            room = shared.backlog.value - (position - shared.applied.value) if mode == FAST else 0
            if room > 0:
                send(min(room, SEND_CHUNK))
            else:
                time.sleep(0.005)
        if now - flushed >= FLUSH_S:
            producer.flush()
            shared.produced.value = producer.sent_events
            flushed = now
    producer.flush()
    shared.produced.value = producer.sent_events


def _serve_load(base_url: str, users: int, rate: float, shared: _Shared, results: Any) -> None:
    """Runs in its own process: ``GET /recommendations/u{n}?k=10`` open-loop at ``rate`` for
    random users of the stream until told to stop; answers counted as they come, and every
    request's due time (wall clock) and latency (from that due time) returned at the end."""
    import uvloop

    counts = shared.requests

    async def run() -> dict[str, Any]:
        rng = np.random.default_rng(1)
        client = KeepAliveClient(base_url)
        latencies: list[tuple[float, float]] = []  # (due, wall clock; latency, s)
        pending: set[asyncio.Task[None]] = set()

        async def one(due: float, user: str) -> None:
            try:
                status = await client.get(f"/recommendations/{user}?k=10")
                kind = OK if status == 200 else SERVER_ERROR if status >= 500 else CLIENT_ERROR
            except CLIENT_ERRORS:
                kind = NO_ANSWER
            latencies.append((wall + due - begin, time.perf_counter() - due))
            counts[kind] += 1

        begin, wall = time.perf_counter(), time.time()
        n = 0
        while not shared.stop_load.is_set():
            due = begin + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(due, f"u{rng.integers(users)}"))
            pending.add(task)
            task.add_done_callback(pending.discard)
            counts[SENT] += 1
            n += 1
        elapsed = time.perf_counter() - begin
        if pending:
            await asyncio.gather(*pending)
        client.close()
        return {
            "requests": n,
            "achieved_rps": round(n / elapsed, 1),
            "latencies": np.array(latencies).reshape(-1, 2),
        }

    results.put(uvloop.run(run()))


def window_latency(
    latencies: np.ndarray, since: float, until: float = float("inf")
) -> dict[str, Any]:
    """How many requests fell due in [since, until) (wall clock), and their latency figures."""
    due = latencies[:, 0]
    ms = latencies[(due >= since) & (due < until), 1] * 1000.0
    return {"requests": len(ms), **(latency_figures(ms) if len(ms) else {})}


# --- probes ----------------------------------------------------------------------------------
def _rss_mib(pid: int) -> float | None:
    """Resident memory of a process (VmRSS in /proc/<pid>/status); None where there is none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _servers(store: Any) -> list[redis.Redis]:
    """Each server behind ``store``: itself, or a Cluster's primaries."""
    if isinstance(store, RedisCluster):
        return [store.get_redis_connection(node) for node in store.get_primaries()]
    return [store]


def redis_forks(store: Any) -> int:
    """Children the servers behind ``store`` have forked since they started (``total_forks``:
    append-only file rewrites and snapshots)."""
    return sum(int(server.info("stats")["total_forks"]) for server in _servers(store))


def compact_append_only_files(store: Any, timeout_s: float = 120.0) -> float | None:
    """Have every server behind ``store`` that keeps an append-only file rewrite it now
    (``BGREWRITEAOF``) and wait until each has; the seconds it took, or None where a server
    refuses the command (a managed Redis may).

    A server rewrites the file by itself once it has grown past ``auto-aof-rewrite-percentage``
    of its last rewrite: a forked child writes the whole state, a core busy for up to a second.
    The file grows with every write (several MB a second under the bench's load), so the
    run's earlier phases make one due at a moment of their choosing; rewritten just before a
    measured window, the file does not come due inside it at the bench's rates."""
    started = time.monotonic()
    servers = [s for s in _servers(store) if int(s.info("persistence").get("aof_enabled", 0))]
    for server in servers:
        try:
            server.bgrewriteaof()
        except redis.ResponseError as exc:
            if "already in progress" not in str(exc):
                return None

    def rewritten() -> bool:
        for server in servers:
            state = server.info("persistence")
            if int(state["aof_rewrite_in_progress"]) or int(state["aof_rewrite_scheduled"]):
                return False
        return True

    wait_for(rewritten, timeout_s, "Redis to rewrite its append-only file")
    return round(time.monotonic() - started, 2)


def _local_redis_pid(store: redis.Redis) -> int | None:
    """redis-server's pid when it runs on this machine (not in a container or elsewhere)."""
    pid = int(store.info("server")["process_id"])
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    return pid if name.startswith("redis") else None


def load_average_now() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --- results ---------------------------------------------------------------------------------
MEMORY = {
    "worker_rss_mib": "worker RSS",
    "reader_rss_mib": "reader RSS",
    "redis_rss_mib": "redis-server RSS",
    "redis_used_memory_mib": "Redis used_memory",
}


def _slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares growth per minute of (seconds, value) points; None below two points."""
    if len(points) < 2 or len({t for t, _ in points}) < 2:
        return None
    t, v = np.array(points).T
    return round(float(np.polyfit(t / 60.0, v, 1)[0]), 2)


def _series(samples: list[dict[str, Any]], field: str) -> dict[str, Any]:
    """Start, end, max and growth per minute of one field over the hold; growth also over its
    second half, where a state that fills up at first has levelled off and a leak has not."""
    idle = [s[field] for s in samples if s["phase"] == "idle"]
    hold = [(s["t_s"], s[field]) for s in samples if s["phase"] == "hold" and s[field] is not None]
    if not hold:
        return {"idle": idle[0] if idle else None, "start": None, "end": None, "max": None}
    late = [p for p in hold if p[0] >= (hold[0][0] + hold[-1][0]) / 2]
    return {
        "idle": idle[0] if idle else None,
        "start": hold[0][1],
        "end": hold[-1][1],
        "max": max(v for _, v in hold),
        "growth_per_min": _slope_per_min(hold),
        "growth_per_min_late": _slope_per_min(late),
    }


def _summarise(
    settings: Settings,
    samples: list[dict[str, Any]],
    probe: dict[str, Any],
    hold: dict[str, Any],
    serving: dict[str, Any],
    serve_rps: float,
    load_average: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    held = hold["target_events_per_s"]
    lag = _series(samples, "lag")
    lag["floor"] = round(LAG_FLOOR_S * held)
    lag["bound"] = round(LAG_BOUND_S * held)
    lags = [s["lag"] for s in samples if s["phase"] == "hold"]
    third = len(lags) // 3
    rising = third > 0 and min(lags[-third:]) > max(lags[:third])
    lag["rising"] = rising
    start = next(s for s in samples if s["phase"] == "hold")
    end = samples[-1]
    errors = {
        field: end[field] - start[field]
        for field in ("requests", "reader_errors", "reader_5xx", "no_answer")
    }
    failures = []
    if lag["end"] > lag["floor"] and (lag["end"] > lag["bound"] or rising):
        failures.append(
            f"the worker fell behind: lag {lag['end']:,} events at the end "
            f"({lag['end'] / held:.0f} s of the held rate), "
            + (
                f"rising through the hold ({lag['growth_per_min']:+,.0f} events/min)"
                if rising
                else f"over the bound of {LAG_BOUND_S:.0f} s"
            )
        )
    if errors["reader_errors"]:
        failures.append(
            f"the reader failed {errors['reader_errors']:,} of the hold's "
            f"{errors['requests']:,} requests: {errors['reader_5xx']:,} answered 5xx, "
            f"{errors['no_answer']:,} unanswered in {REQUEST_TIMEOUT_S:.0f} s, "
            f"{errors['reader_errors'] - errors['reader_5xx'] - errors['no_answer']:,} "
            "other non-200"
        )
    notes = []
    if hold["produced_events_per_s"] < 0.95 * held:
        notes.append(
            f"the producer sent {hold['produced_events_per_s']:,.0f} events/s of the "
            f"{held:,.0f} asked: it, not the worker, set the held rate"
        )
    if probe["backlog_mean"] < 0.1 * probe["backlog_cap"]:
        notes.append(
            "the probe's backlog stayed low: the producer may have set the maximum, not the worker"
        )
    return {
        "ok": not failures,
        "failures": failures,
        "notes": notes,
        "seconds": seconds,
        "rates": {
            "max_events_per_s": probe["max_events_per_s"],
            "hold_share": HOLD_SHARE,
            **{k: v for k, v in hold.items() if k != "cpu_share"},
            "probe": probe,
        },
        "cpu_share": hold["cpu_share"],
        "memory_mib": {field: _series(samples, field) for field in MEMORY},
        "lag_events": lag,
        "serving": {
            "target_rps": serve_rps,
            **serving,
            "errors": errors["reader_errors"],
            "errors_5xx": errors["reader_5xx"],
            "unanswered": errors["no_answer"],
            "before_hold": {
                "requests": start["requests"],
                "errors": start["reader_errors"],
                "errors_5xx": start["reader_5xx"],
                "unanswered": start["no_answer"],
            },
        },
        "load_average": load_average,
        "setup": {
            "cpus": os.cpu_count(),
            "partitions": settings.partitions,
            "batch_size": settings.batch_size,
            "events_per_message": EVENTS_PER_MESSAGE,
            "synthetic_users": SYNTH_USERS,
            "synthetic_items": SYNTH_ITEMS,
            "synthetic_events_per_cycle": SYNTH_EVENTS,
            "topic_prefix": settings.topic_prefix,
            "key_prefix": settings.key_prefix,
        },
        "samples": samples,
    }


def format_soak(results: dict[str, Any]) -> str:
    """Rates, then memory and lag at the hold's start and end, then the verdict."""
    r, s = results["rates"], results["serving"]
    load = results["load_average"]
    lines = [
        f"freshrec bench --soak: {r['seconds']:,.0f} s held; {results['setup']['cpus']} CPUs "
        f"shared with Kafka and Redis; load average {load.get('start')} at the start, "
        f"{load.get('end')} at the end",
        f"maximum sustained ingest {r['max_events_per_s']:,.0f} events/s ({holds_text(r['probe'])}"
        f"); held {r['target_events_per_s']:,.0f} events/s "
        f"({r['hold_share']:.0%}): produced {r['produced_events_per_s']:,.0f}, learned "
        f"{r['applied_events_per_s']:,.0f}",
        f"serving {s['target_rps']:,.0f} req/s: {s['hold_requests']:,} requests in the hold, "
        f"p50 {s.get('p50_ms', float('nan')):.1f} ms, p99 {s.get('p99_ms', float('nan')):.1f} "
        f"ms, {s['errors']} errors ({s['errors_5xx']} 5xx, {s['unanswered']} unanswered); "
        f"before it (probe, search, drain): {s['before_hold']['requests']:,} requests, "
        f"{s['before_hold']['errors']:,} errors ({s['before_hold']['errors_5xx']:,} 5xx)",
        "",
        f"{'':<20}{'idle':>9}{'start':>9}{'end':>9}{'max':>9}{'per min':>10}{'per min, late':>15}",
    ]

    def row(label: str, v: dict[str, Any], digits: int) -> str:
        def cell(x: float | None, width: int, sign: bool = False) -> str:
            if x is None:
                return f"{'-':>{width}}"
            return f"{x:>{'+' if sign else ''}{width},.{digits}f}"

        return (
            f"{label:<20}{cell(v['idle'], 9)}{cell(v['start'], 9)}{cell(v['end'], 9)}"
            f"{cell(v['max'], 9)}{cell(v.get('growth_per_min'), 10, True)}"
            f"{cell(v.get('growth_per_min_late'), 15, True)}"
        )

    for field, label in MEMORY.items():
        lines.append(row(f"{label}, MiB", results["memory_mib"][field], 1))
    lines.append(row("lag, events", results["lag_events"], 0))
    cpu = results["cpu_share"]
    lines.append(f"\nCPU over the hold (cores): worker {cpu['worker']}, reader {cpu['reader']}")
    lines += [f"note: {n}" for n in results["notes"]]
    if results["ok"]:
        lines.append("soak: ok (the worker kept up and the reader answered every request)")
    else:
        lines += [f"soak FAILED: {f}" for f in results["failures"]]
    return "\n".join(lines)
