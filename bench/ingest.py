"""``freshrec bench``: update throughput of the direct path and of the full pipeline, side by side.

On a shared, noisy two-core machine an absolute figure says little; a ratio of two figures
measured in the same run says much more. So one run measures, interleaved and ``repeat`` times:

* ``direct``: `freshrec.store.batch_update.BatchUpdater.apply` in this process on validated events,
  in batches of ``FRESHREC_BATCH_SIZE``: the models and Redis alone;
* ``pipeline``: one real worker process (``freshrec worker``) consuming messages produced
  before the clock starts, timed from its consumer group's assignment until Redis counts every
  event applied: Kafka, Faust, decoding, validation, the models and Redis;
* ``noop``: a Faust agent configured like the worker that takes the same batches of the same
  messages and does nothing with them: the framework's own ceiling on this broker;

the last two with arrays of ``events_per_message`` events per message (as the producer helper
sends them) and again with single-event messages. Figures are medians over the runs; ratios are
medians of per-run ratios, each taken between runs measured next to each other.

``python -m freshrec.bench.ingest noop --app-id ID`` runs the no-op agent; the bench starts it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from freshrec.connections import kafka_config, redis_client, redis_sync_client
from freshrec.devenv.processes import Children, free_port, group_is_consuming
from freshrec.progress import Say
from freshrec.settings import Settings, mask_url

if TYPE_CHECKING:
    import faust
    from confluent_kafka.admin import AdminClient

    from freshrec.streams.events import Event

TARGET_EVENTS_PER_S = 10_000.0
"""The pipeline's goal per worker, with every update on and a history window of 10."""
TARGET_NOOP_RATIO = 0.7
"""The pipeline's goal relative to a no-op agent fed the same messages."""
HISTORY_WINDOW = 10
SYNTH_USERS = 2000
SYNTH_ITEMS = 1000
SYNTH_SEED = 7

MEASUREMENTS = {
    "direct": "in-process, {batch} events/batch",
    "direct_drift": "in-process, {batch} events/batch, drift monitor on",
    "pipeline": "worker, {epm} events/message",
    "noop": "no-op agent, {epm} events/message",
    "pipeline_single": "worker, 1 event/message",
    "noop_single": "no-op agent, 1 event/message",
}

# Worker metrics read before and after a pipeline run: where the worker's time went.
_WORKER_METRICS = (
    "freshrec_batch_apply_seconds_sum",
    "freshrec_batches_total",
    "freshrec_events_total",
)


@dataclass(frozen=True)
class Run:
    """One timed pass over a topic (or over the events, for the direct path)."""

    events: int
    messages: int | None
    seconds: float
    cpu_seconds: float | None = None
    apply_seconds: float | None = None  # pipeline: inside BatchUpdater.apply (worker metrics)
    batches: int | None = None


# --- the whole bench -------------------------------------------------------------------------
def run_bench(
    settings: Settings,
    events: int = 100_000,
    repeat: int = 3,
    show_progress: bool = True,
    events_per_message: int = 100,
    single_events: int | None = None,
) -> dict[str, Any]:
    """Measure every path ``repeat`` times in one run; figures, medians and paired ratios.

    ``single_events`` (default ``events // 5``) sizes the single-event-message topic, which is
    consumed one framework pass per event and so needs fewer events to time.
    """
    from freshrec.devenv import local_services

    if events < 1 or repeat < 1 or events_per_message < 1:
        raise ValueError("events, repeat and events_per_message must be at least 1")
    single_events = max(1, single_events if single_events is not None else events // 5)
    single_events = min(single_events, events)
    say = Say(show_progress)
    endpoints, stop_services = local_services.resolve(settings)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    base = dataclasses.replace(
        settings,
        kafka_bootstrap=endpoints.kafka_bootstrap,
        redis_url=endpoints.redis_url,
        topic_prefix=f"freshrec-bench-{tag}",
        key_prefix=f"frbench-{tag}",
        history_window=HISTORY_WINDOW,
        worker_metrics_port=0,
        serve_host="127.0.0.1",
    )
    bench = _Bench(base, say)
    try:
        say(
            f"bench: Kafka {endpoints.kafka_bootstrap}, Redis {mask_url(endpoints.redis_url)} "
            f"({endpoints.source}); work folder {bench.workdir}"
        )
        runs = bench.measure(events, repeat, events_per_message, single_events)
        results = _summarise(base, endpoints.source, runs, events_per_message)
        bench.succeeded = True
        return results
    finally:
        bench.close()
        stop_services()


class _Bench:
    """The run's topics, key prefixes, processes and consumer groups, all removed at the end."""

    def __init__(self, base: Settings, say: Say) -> None:
        from confluent_kafka.admin import AdminClient

        self.base = base
        self.say = say
        self.workdir = Path(tempfile.mkdtemp(prefix="freshrec-bench-"))
        self.admin: AdminClient = AdminClient(kafka_config(base, log_level=3))
        self.store = redis_sync_client(base)
        self.topic_settings: list[Settings] = []
        self.groups: set[str] = set()
        # In the work folder, so the data folders Faust creates go where the bench cleans up.
        self.children = Children(self.workdir, base)
        self.succeeded = False

    # --- the measurements --------------------------------------------------------------------
    def measure(
        self, events: int, repeat: int, events_per_message: int, single_events: int
    ) -> dict[str, list[Run]]:
        from freshrec.evaluation.synth import SynthConfig, generate
        from freshrec.streams.events import EventValidator
        from freshrec.streams.partitioner import partition_for

        say = self.say
        stream = generate(
            SynthConfig(events=events, users=SYNTH_USERS, items=SYNTH_ITEMS, seed=SYNTH_SEED)
        )
        validator = EventValidator(self.base)
        valid = [validator.parse_one(e) for e in stream.events]
        # Offsets as a worker would see them: counted per partition of the user's key.
        counters: dict[int, int] = {}
        origins: list[tuple[str, int]] = []
        for event in valid:
            p = partition_for(event.user_id, self.base.partitions)
            counters[p] = counters.get(p, -1) + 1
            origins.append((f"{self.base.events_topic}/{p}", counters[p]))
        say(
            f"bench: {events:,} synthetic events ({SYNTH_USERS:,} users, {SYNTH_ITEMS:,} items); "
            f"producing them before any clock starts"
        )
        batched = self._topic("b", stream.events, events_per_message)
        single = self._topic("s", stream.events[:single_events], 1)

        runs: dict[str, list[Run]] = {name: [] for name in MEASUREMENTS}
        for r in range(1, repeat + 1):
            plan: list[tuple[str, Callable[[], Run]]] = [
                ("direct", lambda r=r: self._direct(f"d{r}", valid, origins)),
                ("direct_drift", lambda r=r: self._direct(f"dd{r}", valid, origins, drift=True)),
                ("pipeline", lambda r=r: self._pipeline(batched, f"p{r}")),
                ("noop", lambda r=r: self._noop(batched, f"n{r}")),
                ("pipeline_single", lambda r=r: self._pipeline(single, f"ps{r}")),
                ("noop_single", lambda r=r: self._noop(single, f"ns{r}")),
            ]
            for name, measure in plan:
                run = measure()
                runs[name].append(run)
                say(f"bench: {name} {r}/{repeat}: {_describe_run(run)}")
        return runs

    def _topic(self, suffix: str, events: Sequence[dict[str, Any]], per_message: int) -> _Topic:
        from freshrec.streams.producer import EventProducer
        from freshrec.streams.topics import ensure_topics

        settings = dataclasses.replace(self.base, topic_prefix=f"{self.base.topic_prefix}-{suffix}")
        self.topic_settings.append(settings)
        ensure_topics(settings.kafka_bootstrap, settings)
        started = time.perf_counter()
        producer = EventProducer(
            settings.kafka_bootstrap, settings.events_topic, per_message, kafka_config(settings)
        )
        producer.send_many(events)
        producer.flush(timeout=120)
        self.say(
            f"bench: {settings.events_topic}: {producer.sent_events:,} events in "
            f"{producer.sent_messages:,} messages (produced in "
            f"{time.perf_counter() - started:.1f} s)"
        )
        return _Topic(settings, producer.sent_events, producer.sent_messages)

    def _direct(
        self, label: str, events: list[Event], origins: list[tuple[str, int]], drift: bool = False
    ) -> Run:
        settings = self._keyed(self.base, label)
        try:
            return asyncio.run(_apply_all(settings, events, origins, drift))
        finally:
            self._delete_keys(settings.key_prefix)

    def _pipeline(self, topic: _Topic, label: str) -> Run:
        port = free_port()
        settings = dataclasses.replace(self._keyed(topic.settings, label), worker_metrics_port=port)
        group = f"{settings.topic_prefix}-worker"  # the worker's app id is its group id
        args = ["worker", "--loglevel", "warning"]
        proc = self.children.start(label, args, settings=settings, cwd=self.workdir)
        try:
            self.groups.add(group)
            started, cpu_before = self._wait_assigned(group, proc, label)
            metrics_before = scrape_worker(port)
            finished = self._wait_applied(settings, "events", topic.events, proc, label)
            cpu_after = process_cpu_seconds(proc.pid)
            metrics_after = _scrape_settled(port, topic.events)
        finally:
            self.children.stop(label)
            self._delete_group(group)
            self._delete_keys(settings.key_prefix)
        delta = {
            name: metrics_after[name] - metrics_before.get(name, 0.0)
            for name in _WORKER_METRICS
            if name in metrics_after
        }
        return Run(
            events=topic.events,
            messages=topic.messages,
            seconds=max(finished - started, 1e-6),
            cpu_seconds=_difference(cpu_after, cpu_before),
            apply_seconds=delta.get("freshrec_batch_apply_seconds_sum"),
            batches=_int_or_none(delta.get("freshrec_batches_total")),
        )

    def _noop(self, topic: _Topic, label: str) -> Run:
        settings = self._keyed(topic.settings, label)
        group = f"{settings.topic_prefix}-noop-{label}"
        args = ["noop", "--app-id", group]
        proc = self.children.start(
            label, args, settings=settings, module="freshrec.bench.ingest", cwd=self.workdir
        )
        try:
            self.groups.add(group)
            started, cpu_before = self._wait_assigned(group, proc, label)
            finished = self._wait_applied(settings, "messages", topic.messages, proc, label)
            cpu_after = process_cpu_seconds(proc.pid)
        finally:
            self.children.stop(label)
            self._delete_group(group)
            self._delete_keys(settings.key_prefix)
        return Run(
            events=topic.events,
            messages=topic.messages,
            seconds=max(finished - started, 1e-6),
            cpu_seconds=_difference(cpu_after, cpu_before),
        )

    # --- processes and waiting ---------------------------------------------------------------
    def _keyed(self, settings: Settings, label: str) -> Settings:
        """A fresh key prefix per run: every run starts from empty state and no watermarks."""
        return dataclasses.replace(settings, key_prefix=f"{self.base.key_prefix}-{label}")

    def _wait_assigned(
        self, group: str, proc: subprocess.Popen[bytes], label: str, timeout_s: float = 120.0
    ) -> tuple[float, float | None]:
        """Time and process CPU time when the group has its partitions: the clock's start."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise self.children.exited(label)
            if group_is_consuming(self.base.kafka_bootstrap, group, self.admin):
                return time.monotonic(), process_cpu_seconds(proc.pid)
            time.sleep(0.02)
        raise TimeoutError(
            f"{label}: consumer group {group} got no partitions in {timeout_s:.0f} s"
        )

    def _wait_applied(
        self,
        settings: Settings,
        counter: str,
        total: int,
        proc: subprocess.Popen[bytes],
        label: str,
        stall_s: float = 60.0,
    ) -> float:
        """Time when Redis first shows ``counter`` at ``total``: the clock's end.

        Observed here (every 10 ms), not taken from the process, so the end is measured the same
        way for every process. A process whose agent keeps crashing stays alive; a count that
        has not moved for ``stall_s`` ends the wait with the process's log.
        """
        from freshrec.store.keys import Keys

        stats = Keys(settings.key_prefix).worker_stats
        last, moved = -1, time.monotonic()
        while True:
            raw = self.store.hget(stats, counter)
            count = int(raw or 0)
            if count >= total:
                return time.monotonic()
            if proc.poll() is not None:
                raise self.children.exited(label)
            if count != last:
                last, moved = count, time.monotonic()
            elif time.monotonic() - moved > stall_s:
                raise self.children.exited(
                    label,
                    f"applied {count:,} of {total:,} {counter}, none in {stall_s:.0f} s",
                )
            time.sleep(0.01)

    # --- cleanup -----------------------------------------------------------------------------
    def _delete_group(self, group: str, timeout_s: float = 90.0) -> None:
        delete_group(self.admin, group, timeout_s)
        self.groups.discard(group)

    def _delete_keys(self, prefix: str) -> None:
        doomed = list(self.store.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(doomed), 1000):
            self.store.unlink(*doomed[start : start + 1000])

    def close(self) -> None:
        from freshrec.streams.topics import delete_topics, topic_specs

        self.children.stop()
        for group in list(self.groups):
            try:
                self._delete_group(group, timeout_s=30)
            except Exception as exc:  # cleanup goes on; the group is empty and will expire
                print(f"bench: consumer group {group} not deleted: {exc}", file=sys.stderr)
        for settings in self.topic_settings:
            delete_topics(settings.kafka_bootstrap, list(topic_specs(settings)), settings=settings)
        self._delete_keys(f"{self.base.key_prefix}-*")
        self.store.close()
        # Let librdkafka's client go now: alive, it would go on reconnecting (and logging so)
        # to the broker the bench stops next.
        del self.admin
        if self.succeeded:
            shutil.rmtree(self.workdir, ignore_errors=True)


def delete_group(admin: AdminClient, group: str, timeout_s: float = 90.0) -> None:
    """Forget a consumer group's offsets (so the next run on its topics reads them from the
    start), once its stopped members have left; a group that is not there is fine."""
    from confluent_kafka import KafkaError, KafkaException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.delete_consumer_groups([group], request_timeout=10)[group].result()
            return
        except KafkaException as exc:
            code = exc.args[0].code() if exc.args else None
            if code == KafkaError.GROUP_ID_NOT_FOUND:
                return
            if code != KafkaError.NON_EMPTY_GROUP or time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # a stopped member is still leaving the group


@dataclass(frozen=True)
class _Topic:
    settings: Settings
    events: int
    messages: int


async def _apply_all(
    settings: Settings, events: list[Event], origins: list[tuple[str, int]], drift: bool = False
) -> Run:
    """The direct path: ``FRESHREC_BATCH_SIZE`` events per batch, with origins as the worker
    passes them (so offset watermarks are checked and written), one batch after another; with
    ``drift``, each batch then feeds the worker's drift monitor as the worker does."""
    from freshrec.store.batch_update import BatchUpdater
    from freshrec.store.drift_log import BatchDrift
    from freshrec.store.keys import Keys

    client = redis_client(settings)
    try:
        updater = BatchUpdater(
            client,
            Keys(settings.key_prefix),
            settings.model_config(),
            atomic=settings.exactly_once,
        )
        await client.ping()
        size = settings.batch_size
        watch = BatchDrift() if drift else None
        cpu, started = time.process_time(), time.perf_counter()
        for start in range(0, len(events), size):
            batch = events[start : start + size]
            result = await updater.apply(batch, origins[start : start + size])
            if watch is not None:
                items, users = [e.item_id for e in batch], [e.user_id for e in batch]
                watch.observe(items, users, result.rating_errors, result.max_ts)
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
    finally:
        await client.aclose()
    return Run(
        events=len(events),
        messages=None,
        seconds=seconds,
        cpu_seconds=cpu,
        batches=-(-len(events) // size),
    )


# --- the no-op agent -------------------------------------------------------------------------
def create_noop_app(settings: Settings, app_id: str) -> faust.App:
    """A Faust app that takes batches like the worker and only counts them, in Redis.

    One HINCRBY per batch (field ``messages`` of the stats hash under its key prefix) is the
    least that makes its progress observable from outside, as the worker's own count is.
    """
    from freshrec.store.keys import Keys
    from freshrec.streams.worker import faust_app

    app = faust_app(app_id, settings, settings.kafka_bootstrap)
    topic = app.topic(settings.events_topic, value_type=bytes, key_type=bytes)
    stats = Keys(settings.key_prefix).worker_stats

    @app.agent(topic)
    async def drain(stream: faust.StreamT) -> None:
        client = redis_client(settings)
        async for batch in stream.take_events(settings.batch_size, within=settings.batch_within_s):
            await client.hincrby(stats, "messages", len(batch))

    return app


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m freshrec.bench.ingest")
    sub = parser.add_subparsers(dest="command", required=True)
    noop = sub.add_parser("noop", help="run the no-op agent (FRESHREC_* from the environment)")
    noop.add_argument("--app-id", required=True, help="Faust app id, which is its consumer group")
    noop.add_argument("--loglevel", default="warning")
    args = parser.parse_args(argv)
    from freshrec.streams.worker import faust_worker

    settings = Settings.from_env()
    if not settings.kafka_bootstrap or not settings.redis_url:
        parser.error("FRESHREC_KAFKA_BOOTSTRAP and FRESHREC_REDIS_URL must be set")
    app = create_noop_app(settings, args.app_id)
    faust_worker(app, args.loglevel).execute_from_commandline()
    return 0


# --- probes ----------------------------------------------------------------------------------
def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process, from /proc (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, all) CPU seconds of the whole machine since boot, every core summed, from
    /proc/stat (Linux); None elsewhere. Idle and I/O wait count as not busy; steal counts as
    busy, since a process waiting for it waits as it would for a busy core."""
    try:
        ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    if len(ticks) < 5:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    total = sum(ticks[:8])  # guest time is already inside user time
    return (total - ticks[3] - ticks[4]) / hz, total / hz


def busy_share(
    before: tuple[float, float] | None, after: tuple[float, float] | None
) -> float | None:
    """The share of the machine's CPU time that was busy between two `machine_cpu_seconds`
    (at most 1: on a fully busy machine the two differences differ only by float rounding)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return min(1.0, (after[0] - before[0]) / (after[1] - before[1]))


def worker_samples(port: int) -> list[Any]:
    """Every sample of the worker's /metrics (name, labels, value); none if it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return []
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def scrape_worker(port: int) -> dict[str, float]:
    """The worker's counters that say where its time went; empty if /metrics does not answer."""
    out: dict[str, float] = {}
    for sample in worker_samples(port):
        if sample.name in _WORKER_METRICS:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def _scrape_settled(port: int, events: int, timeout_s: float = 3.0) -> dict[str, float]:
    """Metrics once the last batch is in them: the worker counts a batch just after it lands."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = scrape_worker(port)
        if metrics.get("freshrec_events_total", 0.0) >= events or time.monotonic() > deadline:
            return metrics
        time.sleep(0.02)


def _difference(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else round(value)


# --- results ---------------------------------------------------------------------------------
def _describe_run(run: Run) -> str:
    text = f"{run.events:,} events in {run.seconds:.2f} s, {run.events / run.seconds:,.0f} events/s"
    if run.messages is not None:
        text += f", {run.messages / run.seconds:,.0f} msgs/s"
    if run.cpu_seconds is not None:
        text += f", {1e6 * run.cpu_seconds / run.events:,.0f} µs CPU/event"
    if run.apply_seconds is not None and run.messages is not None:
        text += f", {100 * run.apply_seconds / run.seconds:.0f}% in apply"
    return text


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _summarise(
    settings: Settings, source: str, runs: dict[str, list[Run]], events_per_message: int
) -> dict[str, Any]:
    measurements: dict[str, dict[str, Any]] = {}
    for name, done in runs.items():
        rates = [r.events / r.seconds for r in done]
        first = done[0]
        measurements[name] = {
            "what": MEASUREMENTS[name].format(epm=events_per_message, batch=settings.batch_size),
            "events": first.events,
            "messages": first.messages,
            "events_per_s": _rounded(statistics.median(rates)),
            "messages_per_s": _rounded(
                None
                if first.messages is None
                else statistics.median(
                    [r.messages / r.seconds for r in done if r.messages is not None]
                )
            ),
            "seconds": _rounded(statistics.median(r.seconds for r in done), 3),
            "events_per_s_min": _rounded(min(rates)),
            "events_per_s_max": _rounded(max(rates)),
            "events_per_s_runs": [round(v, 1) for v in rates],
            "runs": len(done),
            "cpu_us_per_event": _rounded(
                _median([_per(r.cpu_seconds, r.events, 1e6) for r in done])
            ),
            "cpu_us_per_message": _rounded(
                _median([_per(r.cpu_seconds, r.messages, 1e6) for r in done])
            ),
            "apply_share": _rounded(_median([_per(r.apply_seconds, r.seconds) for r in done]), 3),
            "events_per_batch": _rounded(
                _median([_per(float(r.events), r.batches) for r in done if r.batches])
            ),
        }

    def paired(top: str, bottom: str) -> list[float]:
        return [
            (a.events / a.seconds) / (b.events / b.seconds)
            for a, b in zip(runs[top], runs[bottom], strict=True)
        ]

    def ratio(values: list[float], target: float | None, what: str) -> dict[str, Any]:
        return {
            "what": what,
            "value": round(statistics.median(values), 4),
            "runs": [round(v, 4) for v in values],
            "target": target,
        }

    pipeline_rates = [r.events / r.seconds for r in runs["pipeline"]]
    ratios = {
        "pipeline_over_noop": ratio(
            paired("pipeline", "noop"),
            TARGET_NOOP_RATIO,
            f"pipeline / no-op, {events_per_message} events/message",
        ),
        "pipeline_single_over_noop_single": ratio(
            paired("pipeline_single", "noop_single"),
            TARGET_NOOP_RATIO,
            "pipeline / no-op, 1 event/message",
        ),
        "pipeline_over_target": ratio(
            [v / TARGET_EVENTS_PER_S for v in pipeline_rates],
            1.0,
            f"pipeline / {TARGET_EVENTS_PER_S:,.0f} events/s",
        ),
        "pipeline_over_direct": ratio(
            paired("pipeline", "direct"), None, "pipeline / direct (batch sizes differ)"
        ),
        "direct_drift_over_direct": ratio(
            paired("direct_drift", "direct"), None, "direct with / without the drift monitor"
        ),
    }
    return {
        "setup": {
            "services": source,
            "kafka_bootstrap": settings.kafka_bootstrap,
            "redis_url": mask_url(settings.redis_url),
            "topic_prefix": settings.topic_prefix,
            "key_prefix": settings.key_prefix,
            "cpus": os.cpu_count(),
            "partitions": settings.partitions,
            "batch_size": settings.batch_size,
            "batch_within_s": settings.batch_within_s,
            "events_per_message": events_per_message,
            "history_window": settings.history_window,
            "mf_factors": settings.mf_factors,
            "implicit_negatives": settings.implicit_negatives,
            "atomic_batches": settings.exactly_once,
            "synthetic_users": SYNTH_USERS,
            "synthetic_items": SYNTH_ITEMS,
        },
        "measurements": measurements,
        "ratios": ratios,
    }


def _per(amount: float | None, count: float | None, scale: float = 1.0) -> float | None:
    if amount is None or not count:
        return None
    return scale * amount / count


def format_results(results: dict[str, Any]) -> str:
    """The measurements as a table, then the ratios against their targets."""
    setup = results["setup"]
    rows = [
        (
            "measurement",
            "events",
            "messages",
            "events/s",
            "msgs/s",
            "range events/s",
            "runs",
            "CPU µs/ev",
            "in apply",
        )
    ]
    for name, m in results["measurements"].items():
        rows.append(
            (
                f"{name}  ({m['what']})",
                f"{m['events']:,}",
                "-" if m["messages"] is None else f"{m['messages']:,}",
                f"{m['events_per_s']:,.0f}",
                "-" if m["messages_per_s"] is None else f"{m['messages_per_s']:,.0f}",
                f"{m['events_per_s_min']:,.0f}-{m['events_per_s_max']:,.0f}",
                str(m["runs"]),
                "-" if m["cpu_us_per_event"] is None else f"{m['cpu_us_per_event']:,.1f}",
                "-" if m["apply_share"] is None else f"{100 * m['apply_share']:.0f}%",
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = [
        f"freshrec bench: medians of {rows[1][6]} runs; {setup['cpus']} CPUs shared with Kafka "
        f"and Redis ({setup['services']}); batches of {setup['batch_size']} messages, history "
        f"window {setup['history_window']}, {setup['mf_factors']} factors, "
        f"{setup['partitions']} partitions",
        "",
    ]
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", f"{'ratio (median of per-run ratios)':<48}{'value':>7}  {'target':<8}{'':<9}runs"]
    for r in results["ratios"].values():
        target, verdict = "", ""
        if r["target"] is not None:
            target = f">= {r['target']:g}"
            verdict = "met" if r["value"] >= r["target"] else "not met"
        runs = " ".join(f"{v:.3g}" for v in r["runs"])
        lines.append(f"{r['what']:<48}{r['value']:>7.3g}  {target:<8}{verdict:<9}{runs}")
    per_batch = [
        f"{name} {m['events_per_batch']:,.0f}"
        for name, m in results["measurements"].items()
        if m["events_per_batch"] is not None
    ]
    if per_batch:
        lines.append("\nevents per batch (mean): " + ", ".join(per_batch))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_main())
