"""``freshrec bench serve``: the reader's latency under a fixed request rate, on a large state.

The state (by default 50,000 items and 100,000 users: factor vectors, histories, co-occurrence
neighbours, popularity, impressions) is written straight into Redis in the layout the workers
produce, under a key prefix of its own. The factors are drawn around taste clusters, or
learned from a real stream by the workers' own learner and grown to the catalogue's size
(`learned_state`), which is the harder case for MF recall's search. One reader process serves
it (or ``readers`` of them on one port, SO_REUSEPORT, as replicas scale out), warmed first; a
*separate* process sends ``GET /recommendations/{user}?k=10`` open-loop at
the target rate (requests are sent on schedule whether or not earlier ones have returned, so a
slow reader shows up as latency, not as a politely lower rate) and records every latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import multiprocessing
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis

from freshrec.bench.ingest import (
    busy_share,
    machine_cpu_seconds,
    process_cpu_seconds,
    worker_samples,
)
from freshrec.bench.mf_search import CELL_SHARES, compare_searches, format_search_comparison
from freshrec.connections import redis_client, redis_sync_client
from freshrec.devenv.isolated_run import isolated_run
from freshrec.devenv.processes import Children, free_port, http_json
from freshrec.evaluation.fetch import DATASETS, find_dataset
from freshrec.evaluation.prequential import load_events
from freshrec.models.config import ModelConfig
from freshrec.models.interaction_learner import (
    INTERACTIONS,
    Interaction,
    InteractionLearner,
    Snapshot,
)
from freshrec.models.mf import implicit_part, vector_width
from freshrec.progress import Say
from freshrec.serving.funnel import Funnel
from freshrec.serving.kernels import warm_up
from freshrec.settings import Settings
from freshrec.store.cluster import is_cluster
from freshrec.store.keys import Keys
from freshrec.store.vectors import VECTOR_DTYPE

NEIGHBOURS = 50
MAX_CONNECTIONS = 256  # the load generator's, like a client's connection pool
REQUEST_TIMEOUT_S = 30.0
HISTORY = 20
CHUNK = 5000
LEARN_BATCH = 1000  # events per learned batch, as the direct update bench applies them
GROWTH_NOISE = 0.25  # a grown vector's noise, as a share of each element's spread
WARM_REQUESTS = 20_000
WARM_CONCURRENCY = 8


def build_state(
    client: redis.Redis,
    keys: Keys,
    items: int,
    users: int,
    factors: int,
    tastes: int = 20,
    learned: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Write a realistic-looking state: Zipf popularity, clustered tastes, co-occurrences.

    Preference factors lie around ``tastes`` cluster centres; with ``tastes=0`` they have no
    cluster structure (each dimension drawn alone, about as spread), the hard case for MF
    recall's cell search. ``learned`` (item and user vectors, `learned_state`) replaces them
    with factors learned from a real stream; popularity, neighbours and histories stay drawn.
    Returns each user's history as item numbers (``users`` x `HISTORY`).
    """
    rng = np.random.default_rng(0)
    width = vector_width(factors)
    now = time.time()
    spread = np.sqrt(0.3**2 + 0.1**2)  # a clustered factor's, centre and offset together
    clusters = rng.normal(0, 0.3, (max(tastes, 1), factors))
    item_cluster = rng.integers(0, max(tastes, 1), items)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.9
    rng.shuffle(popularity)
    names = [f"i{n}" for n in range(items)]

    def vectors(n: int, centres: np.ndarray) -> np.ndarray:
        out = rng.normal(0, 0.1, (n, width)).astype(VECTOR_DTYPE)
        y = slice(factors + 1, 2 * factors + 1)  # freshrec.models.mf.implicit_part
        if tastes:
            out[:, y] += centres
        else:
            out[:, y] = rng.normal(0, spread, (n, factors))
        return out

    if learned is None:
        item_vecs = vectors(items, clusters[item_cluster])
    else:
        item_vecs = learned[0].astype(VECTOR_DTYPE)
    cum = np.cumsum(popularity / popularity.sum())
    pipe = client.pipeline(transaction=False)
    for start in range(0, items, CHUNK):
        block = range(start, min(start + CHUNK, items))
        for n in block:
            pipe.set(keys.item_vector(names[n]), item_vecs[n].tobytes())
            picks = np.searchsorted(cum, rng.random(NEIGHBOURS))
            pipe.zadd(
                keys.neighbours(names[n]),
                {names[p]: float(w) for p, w in zip(picks, rng.random(NEIGHBOURS), strict=True)},
            )
        pipe.zadd(keys.occurrences, {names[n]: float(1000 * popularity[n]) for n in block})
        pipe.zadd(keys.popularity, {names[n]: float(1000 * popularity[n]) for n in block})
        pipe.zadd(keys.impressions, {names[n]: float(500 * popularity[n] * 100) for n in block})
        pipe.zadd(keys.item_first_seen, {names[n]: now - rng.uniform(0, 30 * 86400) for n in block})
        pipe.zadd(keys.updated_items, dict.fromkeys((names[n] for n in block), now))
        pipe.execute()
    pipe.set(keys.impressions_total, 5_000_000)
    histories = np.empty((users, HISTORY), dtype=np.int64)
    user_cluster = rng.integers(0, max(tastes, 1), users)
    if learned is None:
        user_vecs = vectors(users, clusters[user_cluster])
    else:
        user_vecs = learned[1].astype(VECTOR_DTYPE)
    for start in range(0, users, CHUNK):
        for n in range(start, min(start + CHUNK, users)):
            user = f"u{n}"
            pipe.set(keys.user_vector(user), user_vecs[n].tobytes())
            seen = histories[n] = np.searchsorted(cum, rng.random(HISTORY))
            pipe.zadd(keys.history(user), {names[p]: now - i for i, p in enumerate(seen)})
        pipe.execute()
    return histories


def learned_vectors(
    events: Sequence[Interaction], config: ModelConfig, batch: int = LEARN_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """Every user's and item's full vector after learning ``events`` in batches of ``batch``.

    The learning is the workers' own (`InteractionLearner`, each batch from a snapshot of the
    vectors so far, negatives drawn from the batch's items), less Redis: the vectors are what a
    worker would have stored after the same stream. Rows in order of each id's first event.
    """
    learner = InteractionLearner(config)
    vectors: dict[str, np.ndarray] = {}
    mean_sum, mean_n = 0.0, 0
    for start in range(0, len(events), batch):
        part = events[start : start + batch]
        landmark = min((e.ts for e in part), default=0.0)  # the co-occurrences are not kept
        changes = learner.learn_many(part, Snapshot(landmark, mean_sum, mean_n, vectors))
        for name, delta in changes.deltas.items():
            vectors[name] = changes.bases[name] + delta
        mean_sum += changes.mean_sum
        mean_n += changes.mean_n
    order = list(
        dict.fromkeys(
            f"{kind}:{e.user_id if kind == 'u' else e.item_id}"
            for e in events
            if e.type in INTERACTIONS
            for kind in "ui"
        )
    )
    users = [vectors[name] for name in order if name.startswith("u:") and name in vectors]
    items = [vectors[name] for name in order if name.startswith("i:") and name in vectors]
    width = vector_width(config.factors)
    return (
        np.array(users, np.float64).reshape(-1, width),
        np.array(items, np.float64).reshape(-1, width),
    )


def grown(
    vectors: np.ndarray, count: int, rng: np.random.Generator, noise: float = GROWTH_NOISE
) -> np.ndarray:
    """``count`` vectors that keep the geometry of ``vectors``: those first, then copies of
    them picked at random, each element moved by Gaussian noise of ``noise`` times that
    element's spread over ``vectors`` (the last element, a count, is copied as it is).

    So a catalogue or audience learned from a small stream is grown to a large one with the
    same directions, norms and lack (or presence) of cluster structure, which is what decides
    how much of it an inner-product search must read.
    """
    if count <= len(vectors):
        return vectors[:count].copy()
    spread = vectors.std(axis=0)
    spread[-1] = 0.0
    parents = rng.integers(0, len(vectors), count - len(vectors))
    copies = vectors[parents] + rng.normal(0.0, 1.0, (len(parents), vectors.shape[1])) * (
        noise * spread
    )
    return np.concatenate([vectors, copies])


def learned_state(
    source: str, settings: Settings, items: int, users: int, limit: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Item and user vectors learned from ``source`` (a dataset name such as ``ml-100k`` or a
    ratings file), grown to ``items`` and ``users``; and what was learned, for the report."""
    path = find_dataset(source, settings.home) if source in DATASETS else Path(source)
    events, _, _ = load_events(path, settings, limit=limit)
    started = time.perf_counter()
    user_vecs, item_vecs = learned_vectors(events, settings.model_config())
    rng = np.random.default_rng(0)
    about = {
        "source": source,
        "events": len(events),
        "learned_items": len(item_vecs),
        "learned_users": len(user_vecs),
        "learn_seconds": round(time.perf_counter() - started, 1),
        "growth_noise": GROWTH_NOISE,
    }
    return grown(item_vecs, items, rng), grown(user_vecs, users, rng), about


CLIENT_ERRORS = (OSError, TimeoutError, asyncio.IncompleteReadError, IndexError, ValueError)
"""What `KeepAliveClient.get` raises when a request got no answer (or an unreadable one)."""


class KeepAliveClient:
    """GETs over keep-alive HTTP/1.1 connections, one request in flight on each, as many
    connections as the backlog needs up to ``limit``.

    Lean on purpose: aiohttp's client spent ~0.5 ms of CPU per request, which on a small
    machine the reader would lose to its own load generator.
    """

    def __init__(self, url_base: str, limit: int = MAX_CONNECTIONS) -> None:
        self.host, port = url_base.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.limit = limit
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.opened = 0

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.idle.empty() and self.opened < self.limit:
            self.opened += 1
            try:
                return await asyncio.open_connection(self.host, self.port)
            except OSError:
                self.opened -= 1
                raise
        return await self.idle.get()  # at the limit: wait for one to come back

    async def get(self, path: str) -> int:
        """The answer's status; raises one of `CLIENT_ERRORS` when there is none in time."""
        request = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode()
        writer = None
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                reader, writer = await self._connection()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]
                await reader.readexactly(int(length))
        except CLIENT_ERRORS:
            if writer is not None:
                writer.close()
                self.opened -= 1
            raise
        self.idle.put_nowait((reader, writer))
        return int(head[9:12])

    def close(self) -> None:
        while not self.idle.empty():
            self.idle.get_nowait()[1].close()


def _load(url_base: str, users: int, rate: float, seconds: float, queue: Any) -> None:
    """Runs in its own process: open-loop requests, every latency recorded.

    Each latency runs from the request's scheduled time, so queueing anywhere (for a
    connection included) is counted. The machine's busy share is read over the same window
    as the latencies, not the process's start-up. The collector is off while it sends (what
    it inherited frozen first), as ``timeit`` does: a full collection here would delay the
    requests due meanwhile and count against the reader.
    """
    import uvloop

    async def run() -> dict[str, Any]:
        rng = np.random.default_rng(1)
        total = int(rate * seconds)
        latencies = np.full(total, np.nan)
        errors = 0
        client = KeepAliveClient(url_base)

        async def one(n: int, due: float, user: str) -> None:
            nonlocal errors
            try:
                if await client.get(f"/recommendations/{user}?k=10") != 200:
                    errors += 1
            except CLIENT_ERRORS:
                errors += 1
            latencies[n] = time.perf_counter() - due

        begin, cpu, machine = time.perf_counter(), time.process_time(), machine_cpu_seconds()
        tasks = []
        for n in range(total):
            due = begin + n / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n, due, f"u{rng.integers(users)}")))
        await asyncio.gather(*tasks)
        elapsed, cpu = time.perf_counter() - begin, time.process_time() - cpu
        busy = busy_share(machine, machine_cpu_seconds())
        client.close()
        done = latencies[~np.isnan(latencies)] * 1000.0
        return {
            "requests": total,
            "achieved_rps": round(total / elapsed, 1),
            "errors": errors,
            "client_cpu_ms_per_request": round(1000 * cpu / max(total, 1), 3),
            "machine_busy": None if busy is None else round(busy, 3),
            **latency_figures(done),
        }

    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        figures = uvloop.run(run())
    finally:
        gc.enable()
    queue.put(figures)


def latency_figures(ms: np.ndarray) -> dict[str, float]:
    """p50, p90, p99 and max of latencies in milliseconds."""
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "max_ms": round(float(ms.max()), 3),
    }


def run_serve_bench(
    base: Settings,
    items: int = 50_000,
    users: int = 100_000,
    rates: tuple[float, ...] = (250.0, 1000.0),
    seconds: float = 10.0,
    show_progress: bool = True,
    tastes: int = 20,
    factors_from: str | None = None,
    search_queries: int = 2000,
    warm_requests: int = WARM_REQUESTS,
    readers: int = 1,
) -> dict[str, Any]:
    """The reader's latency at each of ``rates`` on a state of ``items`` and ``users``.

    With ``factors_from`` (a dataset name or a ratings file) the factors are learned from that
    stream and grown (`learned_state`) instead of drawn around ``tastes`` clusters. Before the
    reader starts, ``search_queries`` users' MF recall searches are compared in this process
    (`freshrec.bench.mf_search`): nothing else runs then, and the reader's figures follow.
    The reader is first warmed with ``warm_requests`` requests for random users, as many at a
    time as `WARM_CONCURRENCY` (`_warm`), so the rates measure a replica in service. With
    ``readers`` above 1 that many reader processes share the port (the kernel spreads
    connections over them); the CPU per request is theirs together.
    """
    if readers < 1:
        raise ValueError(f"readers must be at least 1, not {readers}")
    say = Say(show_progress)
    learned, about = None, None
    if factors_from is not None:
        item_vecs, user_vecs, about = learned_state(factors_from, base, items, users)
        learned = (item_vecs, user_vecs)
        say(
            f"bench serve: factors learned from {about['events']:,} events of {factors_from} "
            f"({about['learned_items']:,} items, {about['learned_users']:,} users) "
            f"in {about['learn_seconds']} s, grown to {items:,} items and {users:,} users"
        )
    with isolated_run(base, "bench-serve", serve_port=free_port()) as settings:
        client = redis_sync_client(settings)
        children = Children(Path(tempfile.mkdtemp(prefix="freshrec-bench-serve-")), settings)
        try:
            started = time.perf_counter()
            keys = Keys(settings.key_prefix)
            factors = settings.mf_factors
            histories = build_state(client, keys, items, users, factors, tastes, learned)
            say(
                f"bench serve: state of {items:,} items and {users:,} users written "
                f"in {time.perf_counter() - started:.1f} s"
            )
            search = None
            if search_queries:
                search = _compare_searches(client, keys, factors, histories, search_queries)
                overlaps = asyncio.run(
                    _served_overlaps(settings, min(search_queries, users), CELL_SHARES)
                )
                for share, overlap in overlaps.items():
                    search["searches"][f"cells read={share:.0%}"]["served_overlap"] = overlap
                search["searches"]["exact"]["served_overlap"] = 1.0
                say(format_search_comparison(search))
            # The reader loads the kernels this compiles on a first run from the shared cache,
            # so its start-up deadline below never includes a compile.
            say(f"bench serve: {warm_up([settings.funnel_config()])}")
            pids, metrics = _start_readers(children, settings, readers, items)
            base_url = f"http://{settings.serve_host}:{settings.serve_port}"
            warm = _warm(base_url, users, warm_requests, pids)
            say(
                f"bench serve: warmed with {warm['requests']:,} requests in {warm['seconds']} s "
                f"({warm['reader_cpu_ms_per_request']} ms of reader CPU each)"
            )
            runs = []
            for rate in rates:
                cpu_before = _cpu_seconds(pids)
                run = _hold_rate(base_url, users, rate, seconds, say)
                cpu_after = _cpu_seconds(pids)
                run["reader_cpu_ms_per_request"] = (
                    None  # no /proc on this system
                    if cpu_before is None or cpu_after is None
                    else round(1000 * (cpu_after - cpu_before) / run["requests"], 3)
                )
                runs.append(run)
            share_read = _mf_share_read(base_url, users)
            per_reader = [_recommendations_served(port) for port in metrics]
        finally:
            children.stop()
            client.close()
    return {
        "items": items,
        "users": users,
        "tastes": None if learned else tastes,
        "factors_from": about,
        "search": search,
        "mf_share_read": share_read,
        "warm_up": warm,
        "seconds_per_rate": seconds,
        "readers": readers,
        "requests_per_reader": per_reader,
        "cpus": os.cpu_count(),
        "runs": runs,
        "targets": {"p50_ms": 2.0, "p99_ms": 10.0, "rps": 1000.0},
        "setup": {"key_prefix": settings.key_prefix},
    }


def _start_readers(
    children: Children, settings: Settings, readers: int, items: int
) -> tuple[list[int], list[int]]:
    """``readers`` reader processes on the settings' port, each with a metrics port of its own;
    their pids and metrics ports, once every one has loaded ``items`` items (its catalogue
    gauge)."""
    metrics = [free_port() for _ in range(readers)]
    pids = []
    for n, port in enumerate(metrics):
        own = dataclasses.replace(settings, serve_reuse_port=readers > 1, reader_metrics_port=port)
        name = "reader" if readers == 1 else f"reader-{n}"
        pids.append(children.start(name, ["serve"], settings=own).pid)
    for port in metrics:
        children.wait(
            lambda port=port: _catalogue_items(port) >= items,
            120,
            f"the reader with metrics on {port} to load {items:,} items",
        )
    return pids, metrics


def _catalogue_items(metrics_port: int) -> float:
    """The items in a reader's snapshot, from its /metrics; 0 until it answers."""
    samples = worker_samples(metrics_port)
    return max((s.value for s in samples if s.name == "freshrec_catalogue_items"), default=0.0)


def _recommendations_served(metrics_port: int) -> int:
    """The list requests a reader has answered, from its /metrics."""
    samples = worker_samples(metrics_port)
    return int(
        sum(
            s.value
            for s in samples
            if s.name == "freshrec_http_requests_total"
            and s.labels.get("route") == "/recommendations/{user_id}"
        )
    )


def _cpu_seconds(pids: Sequence[int]) -> float | None:
    """The processes' CPU seconds together; None where /proc cannot tell."""
    seconds = [process_cpu_seconds(pid) for pid in pids]
    return None if None in seconds else sum(s for s in seconds if s is not None)


def _warm(base_url: str, users: int, requests: int, pids: Sequence[int]) -> dict[str, Any]:
    """Closed-loop requests for random users until ``requests`` are answered; how long that
    took and the reader's CPU per request.

    A fresh reader reads a recent item's neighbour list from Redis the first time a request
    needs it (`freshrec.serving.item_index.ItemIndex.load_neighbours`); on this state the first
    requests read a score of lists each, several times the cost of a request that reads none.
    The warm-up pays that before the clock starts, with users drawn apart from the measured
    ones (the items they reach follow the same popularity).
    """
    import uvloop

    async def run() -> None:
        client = KeepAliveClient(base_url, WARM_CONCURRENCY)
        picks = iter(np.random.default_rng(3).integers(users, size=requests).tolist())

        async def worker() -> None:
            for user in picks:
                with contextlib.suppress(*CLIENT_ERRORS):  # the measured requests count errors
                    await client.get(f"/recommendations/u{user}?k=10")

        await asyncio.gather(*(worker() for _ in range(WARM_CONCURRENCY)))
        client.close()

    cpu_before, started = _cpu_seconds(pids), time.perf_counter()
    if requests:
        uvloop.run(run())
    cpu_after = _cpu_seconds(pids)
    return {
        "requests": requests,
        "seconds": round(time.perf_counter() - started, 1),
        "reader_cpu_ms_per_request": (
            None
            if cpu_before is None or cpu_after is None or not requests
            else round(1000 * (cpu_after - cpu_before) / requests, 3)
        ),
    }


def _hold_rate(base_url: str, users: int, rate: float, seconds: float, say: Say) -> dict[str, Any]:
    """One load process at ``rate`` for ``seconds``; its latency figures."""
    context = multiprocessing.get_context("spawn")
    queue: Any = context.Queue()
    load = context.Process(target=_load, args=(base_url, users, rate, seconds, queue))
    load.start()
    result = queue.get(timeout=seconds * 10 + 60)
    load.join(30)
    result["target_rps"] = rate
    say(
        f"bench serve: {rate:,.0f} req/s -> p50 {result['p50_ms']} ms, "
        f"p99 {result['p99_ms']} ms, achieved {result['achieved_rps']} req/s"
    )
    return result


def format_serve_results(results: dict[str, Any]) -> str:
    learned = results.get("factors_from")
    state = (
        f"factors learned from {learned['source']} and grown"
        if learned
        else f"{results['tastes'] or 'no'} taste clusters"
    )
    readers = results.get("readers", 1)
    who = "reader" if readers == 1 else f"{readers} readers on one port"
    lines = [
        f"{who}: latency, {results['items']:,} items / {results['users']:,} users "
        f"({state}), "
        f"k=10, {results['seconds_per_rate']:.0f} s per rate, {results['cpus']} CPUs "
        f"({'readers' if readers > 1 else 'reader'}, load generator and Redis share them)",
        f"{'target req/s':>12} {'achieved':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'errors':>6} {'reader CPU ms/req':>17} {'client CPU ms/req':>17} "
        f"{'machine busy':>12}",
    ]
    for r in results["runs"]:
        lines.append(
            f"{r['target_rps']:>12,.0f} {r['achieved_rps']:>9,.0f} {r['p50_ms']:>8.2f} "
            f"{r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['max_ms']:>8.1f} {r['errors']:>6} "
            f"{_cell(r['reader_cpu_ms_per_request']):>17} "
            f"{_cell(r.get('client_cpu_ms_per_request')):>17} "
            f"{_percent(r.get('machine_busy')):>12}"
        )
    if readers > 1:
        served = ", ".join(f"{n:,}" for n in results["requests_per_reader"])
        lines.append(f"list requests answered by each reader (warm-up included): {served}")
    t = results["targets"]
    lines.append(
        f"targets: p50 <= {t['p50_ms']} ms, p99 <= {t['p99_ms']} ms at >= {t['rps']:,.0f} req/s"
    )
    lines.append(
        "machine busy: the share of all cores' time spent working while the rate ran, by "
        "anything on the machine (readers, load generator, Redis, Kafka, neighbours)"
    )
    warm = results.get("warm_up")
    if warm and warm["requests"]:
        lines.append(
            f"warm-up before the rates: {warm['requests']:,} requests for random users in "
            f"{warm['seconds']} s, {_cell(warm['reader_cpu_ms_per_request'])} ms of reader CPU "
            "each (first reads of neighbour lists)"
        )
    if results.get("mf_share_read") is not None:
        lines.append(
            f"MF recall (exact) read {100 * results['mf_share_read']:.1f}% of the items per "
            "request (the reader's debug answers for 50 users); recall 1.0"
        )
    if results.get("search"):
        lines.extend(["", format_search_comparison(results["search"])])
    return "\n".join(lines)


def _compare_searches(
    client: redis.Redis, keys: Keys, factors: int, histories: np.ndarray, queries: int
) -> dict[str, Any]:
    """`compare_searches` on the item and user factors as written, the users' histories seen."""
    items = client.zcard(keys.updated_items)
    item_y = _implicit_rows(client, [keys.item_vector(f"i{n}") for n in range(items)], factors)
    picked = np.random.default_rng(2).choice(len(histories), min(queries, len(histories)), False)
    user_y = _implicit_rows(client, [keys.user_vector(f"u{n}") for n in picked.tolist()], factors)
    return compare_searches(item_y, user_y, [histories[n] for n in picked.tolist()])


async def _served_overlaps(
    settings: Settings, users: int, shares: Sequence[float], k: int = 10
) -> dict[float, float]:
    """For each MF read share: the mean share of the items of a served list of ``k`` that the
    exact search's list also holds, over ``users`` users (one funnel, in this process, on the
    state as written: the effect of an approximate MF recall on what users see)."""
    base = settings.funnel_config()
    client = redis_client(settings)
    funnel = Funnel(client, Keys(settings.key_prefix), base)
    try:
        await funnel.refresh()

        async def lists(share: float) -> list[list[str]]:
            config = dataclasses.replace(base, mf_read_share=share)
            return [
                [c.item_id for c in await funnel.recommend(f"u{n}", k, config)]
                for n in range(users)
            ]

        exact = await lists(1.0)
        out = {}
        for share in shares:
            pairs = zip(exact, await lists(share), strict=True)
            kept = [len(set(a) & set(b)) / len(a) for a, b in pairs if a]
            out[share] = round(float(np.mean(kept)), 4) if kept else 1.0
        return out
    finally:
        await funnel.aclose()
        await client.aclose()


def _implicit_rows(client: redis.Redis, names: list[str], factors: int) -> np.ndarray:
    """The implicit parts ``y`` of the stored vectors ``names``, one row each."""
    blobs = []
    many = client.mget_nonatomic if is_cluster(client) else client.mget  # keys span slots
    for start in range(0, len(names), CHUNK):
        blobs.extend(many(names[start : start + CHUNK]))
    full = np.frombuffer(b"".join(blobs), dtype=VECTOR_DTYPE).reshape(len(names), -1)
    return np.ascontiguousarray(implicit_part(full.T, factors).T)


def _mf_share_read(base_url: str, users: int, requests: int = 50) -> float | None:
    """The mean share of the catalogue MF recall read, from the debug answers of a few users."""
    shares = []
    for n in range(min(requests, users)):
        status, body = http_json(f"{base_url}/recommendations/u{n}?k=10&debug=1")
        if status == 200 and body["debug"]["index_items"]:
            shares.append(body["debug"]["mf_items_read"] / body["debug"]["index_items"])
    return round(float(np.mean(shares)), 4) if shares else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"
