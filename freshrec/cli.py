"""The ``freshrec`` command line: services, worker, reader, data tools and the demo."""

from __future__ import annotations

import os

# Before numpy loads: every freshrec process does numpy work on small arrays from one event
# loop, where BLAS threads only contend with Kafka, Redis and each other (a 50k x 32 product
# took 15x longer with them on two busy cores). Set it to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from freshrec.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = Settings.from_env()
        return int(args.handler(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, TimeoutError, FileNotFoundError) as exc:
        _fail(args, exc)
        return 2
    except Exception as exc:
        if not _service_error(exc):
            raise
        _fail(args, exc)
        return 2


def _service_error(exc: Exception) -> bool:
    """Kafka or Redis refusing or out of reach: the user's to fix, not a bug. Checked by the
    modules as they stand: a command that never imported one cannot have raised its error, and
    importing both here would slow every command's start by a sixth of a second."""
    kafka, redis = sys.modules.get("confluent_kafka"), sys.modules.get("redis.exceptions")
    return (kafka is not None and isinstance(exc, kafka.KafkaException)) or (
        redis is not None and isinstance(exc, redis.RedisError)
    )


def _fail(args: argparse.Namespace, exc: Exception) -> None:
    if getattr(args, "json", False):
        print(json.dumps({"error": str(exc), "kind": type(exc).__name__}))
    print(f"freshrec: error: {exc}", file=sys.stderr)


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=None if args.json else 2) if args.json else text)


_FILE_HELP = "u.data, ratings.dat, CSV with a header, RecBole .inter, or JSON lines"
_FORMAT_HELP = "movielens-udata, movielens-dat, csv, recbole, jsonl (default: detected)"
# Kept in step with freshrec.evaluation.datasets.TS_UNITS (not imported: the parser stays light).
_TS_UNITS = ("s", "ms", "us", "ns", "day")
_TS_UNIT_HELP = (
    "unit of the file's numeric times (default: detected from their magnitude; days are "
    "never guessed)"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freshrec",
        description="Streaming real-time recommender: Kafka events in, fresh recommendations out.",
    )
    parser.add_argument("--log-level", default="warning", help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(handler=handler)
        return p

    p = command("services", _services, "Start, stop or inspect the local Kafka broker and Redis.")
    p.add_argument("action", choices=["up", "down", "status"])

    p = command("worker", _worker, "Run a Faust worker that learns events into Redis.")
    p.add_argument("--loglevel", default="info", help="Faust worker log level")

    p = command("serve", _serve, "Run the reader: the HTTP API over the fresh state.")
    p.add_argument("--host", default=None, help="bind address (default FRESHREC_SERVE_HOST)")
    p.add_argument("--port", type=int, default=None, help="port (default FRESHREC_SERVE_PORT)")

    p = command("replay", _replay, "Publish a ratings or events file to the events topic.")
    p.add_argument("file", type=Path, help=_FILE_HELP)
    p.add_argument(
        "--rate", type=float, default=0.0, help="events per second (0: as fast as possible)"
    )
    p.add_argument("--format", default=None, help=_FORMAT_HELP)
    p.add_argument("--ts-unit", default=None, choices=_TS_UNITS, help=_TS_UNIT_HELP)
    p.add_argument(
        "--events-per-message",
        type=int,
        default=100,
        help="pack up to N events of a partition per message",
    )

    p = command("synth", _synth, "Write a synthetic event stream with known latent factors.")
    p.add_argument("--out", type=Path, default=Path("synth.jsonl"), help="JSON lines file to write")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--change-at", type=int, help="event (position) of an injected concept change")
    p.add_argument(
        "--rotate-user-share", type=float, default=0.0, help="share of users whose tastes rotate"
    )
    p.add_argument(
        "--cluster-items", type=int, default=0, help="items of a new popular cluster released"
    )

    p = command("eval", _eval, "Prequential (test-then-train) evaluation on a ratings/events file.")
    p.add_argument("file", type=Path, help=_FILE_HELP)
    p.add_argument(
        "--mode",
        choices=["pipeline", "direct"],
        default="pipeline",
        help="pipeline: Kafka -> Faust worker -> Redis -> reader; direct: in-process",
    )
    p.add_argument("--format", default=None, help=_FORMAT_HELP)
    p.add_argument("--ts-unit", default=None, choices=_TS_UNITS, help=_TS_UNIT_HELP)
    p.add_argument("--out", type=Path, default=None, help="write a report with PNG plots here")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N events")
    protocol = p.add_mutually_exclusive_group()
    protocol.add_argument(
        "--lag",
        type=float,
        default=None,
        metavar="SECONDS",
        help="predict each event from the events at least this much older (default 1)",
    )
    protocol.add_argument(
        "--chunk",
        type=int,
        default=None,
        metavar="N",
        help="instead: predict blocks of N events from the state before each, then learn them",
    )
    p.add_argument(
        "--freshness",
        action="store_true",
        help="also run every system at each of --freshness-lags: the value of freshness",
    )
    p.add_argument(
        "--freshness-lags",
        default="1,60,3600,86400",
        metavar="S,S,...",
        help="lags in seconds of --freshness (default 1 s, 1 min, 1 h, 1 day)",
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="direct mode: also score the funnel with MF-only and CF-only recall",
    )

    p = command(
        "bench",
        _bench,
        "Measure update throughput (direct path, full pipeline, no-op agent) and freshness "
        "under load (event to served and to published list at 50 and 80 percent of the "
        "maximum ingest rate); `updates` or `freshness` alone; with `serve`, the reader's "
        "latency under load; with --soak, memory and lag of the whole pipeline held at 70 "
        "percent of its maximum ingest rate; with `memory`, Redis memory per user and per item.",
    )
    p.add_argument(
        "target", nargs="?", choices=["updates", "freshness", "serve", "memory"], default=None
    )
    p.add_argument(
        "--soak",
        action="store_true",
        help="soak the whole pipeline (worker, reader, Kafka, Redis) for --seconds (default 600)",
    )
    p.add_argument(
        "--events",
        type=int,
        default=100_000,
        help="updates: events per measurement; memory: events to learn",
    )
    p.add_argument("--repeat", type=int, default=3, help="updates: runs per measurement (medians)")
    p.add_argument(
        "--items",
        type=int,
        default=None,
        help="serve: items in the state (default 50,000); memory: synthetic items (2,000)",
    )
    p.add_argument(
        "--users",
        type=int,
        default=None,
        help="serve: users in the state (default 100,000); memory: synthetic users (10,000)",
    )
    p.add_argument("--rates", default="250,1000", help="serve: request rates to hold, req/s")
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="serve: seconds per rate (default 10); freshness: seconds of tracer events per "
        "load (default 40); --soak: seconds to hold (default 600)",
    )
    p.add_argument(
        "--serve-rps",
        type=float,
        default=100.0,
        help="freshness and --soak: reader requests per second beside the events",
    )
    p.add_argument(
        "--tastes", type=int, default=20, help="serve: taste clusters in the factors (0: none)"
    )
    p.add_argument(
        "--factors-from",
        default=None,
        help="serve: learn the factors from this dataset (ml-100k) or ratings file, then grow "
        "them to --items and --users",
    )
    p.add_argument(
        "--readers",
        type=int,
        default=1,
        help="serve: reader processes sharing the port (SO_REUSEPORT), as replicas scale out",
    )
    p.add_argument(
        "--from",
        dest="source",
        default=None,
        help="memory: learn this dataset (ml-100k) or events file instead of a synthetic stream",
    )

    p = command("demo", _demo, "Run the whole system on a synthetic stream and show it working.")
    p.add_argument("--events", type=int, default=60_000, help="events to replay")
    p.add_argument("--rate", type=float, default=0.0, help="replay rate (0: as fast as possible)")

    from freshrec.evaluation.fetch import DATASETS

    p = command(
        "data", _data, "Fetch a public dataset into FRESHREC_HOME/data, or print where it is."
    )
    p.add_argument("action", choices=["fetch", "path"], help="fetch (once) or print its path")
    p.add_argument("name", choices=sorted(DATASETS), help="the dataset")
    p.add_argument("--force", action="store_true", help="fetch: download even if it is there")

    p = command("config", _config, "Print the effective configuration, or its reference table.")
    p.add_argument("--markdown", action="store_true", help="the README's configuration table")

    p = command("dashboards", _dashboards, "Draw the Grafana dashboards as PNGs from a Prometheus.")
    p.add_argument("action", choices=["render"])
    p.add_argument("--out", type=Path, default=Path("dashboards"), help="folder for the PNGs")
    p.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    p.add_argument("--minutes", type=float, default=30.0, help="the last N minutes (default 30)")
    return parser


# --- handlers ----------------------------------------------------------------------------------


def _services(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.devenv import local_services

    if args.action == "up":
        from freshrec.settings import mask_url

        endpoints = local_services.up(settings)
        shown_url = mask_url(endpoints.redis_url)
        from freshrec.streams.topics import ensure_topics

        ensure_topics(endpoints.kafka_bootstrap, settings)
        _emit(
            args,
            {
                "kafka_bootstrap": endpoints.kafka_bootstrap,
                "redis_url": shown_url,
                "source": endpoints.source,
            },
            f"Kafka  {endpoints.kafka_bootstrap}\nRedis  {shown_url}\n"
            f"(source: {endpoints.source}; use them with\n"
            f"  export FRESHREC_KAFKA_BOOTSTRAP={endpoints.kafka_bootstrap}\n"
            f"  export FRESHREC_REDIS_URL={shown_url}"
            + ("\n  export FRESHREC_REDIS_CLUSTER=1)" if settings.redis_cluster else ")"),
        )
    elif args.action == "down":
        stopped = local_services.down(settings)
        _emit(
            args,
            {"stopped": stopped},
            "\n".join(f"stopped {s}" for s in stopped) or "nothing to stop",
        )
    else:
        status = local_services.status(settings)
        _emit(args, status, json.dumps(status, indent=2))
    return 0


def _endpoints(settings: Settings) -> tuple[str, str]:
    """Configured services, else the local ones (started if not running yet); refused
    credentials or certificates stop the command here, with what to fix."""
    from freshrec.connections import check_kafka, check_redis
    from freshrec.devenv import local_services
    from freshrec.streams.topics import ensure_topics

    endpoints = local_services.up(settings)
    check_redis(settings, endpoints.redis_url)
    check_kafka(settings, endpoints.kafka_bootstrap)
    ensure_topics(endpoints.kafka_bootstrap, settings)
    return endpoints.kafka_bootstrap, endpoints.redis_url


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.streams.worker import run_worker

    bootstrap, redis_url = _endpoints(settings)
    run_worker(settings, bootstrap, redis_url, loglevel=args.loglevel)
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.connections import kafka_config, redis_options
    from freshrec.serving.api import Publishing, run_reader
    from freshrec.serving.variants import Variants
    from freshrec.store.keys import Keys

    bootstrap, redis_url = _endpoints(settings)
    run_reader(
        redis_url,
        Keys(settings.key_prefix),
        settings.funnel_config(),
        host=args.host or settings.serve_host,
        port=args.port or settings.serve_port,
        max_k=settings.max_k,
        max_id_length=settings.max_id_length,
        publishing=Publishing(
            bootstrap,
            settings.recommendations_topic,
            settings.impressions_topic,
            k=settings.publish_k,
            debounce_s=settings.publish_interval_s,
            client_config=kafka_config(settings, bootstrap),
        ),
        variants=Variants.parse(settings.variants, settings.funnel_config()),
        redis_options=redis_options(settings, redis_url),
        reuse_port=settings.serve_reuse_port,
        metrics_port=settings.reader_metrics_port,
        cluster=settings.redis_cluster,
    )
    return 0


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.connections import kafka_config
    from freshrec.evaluation.datasets import count_lines, read_events
    from freshrec.progress import Progress
    from freshrec.streams.producer import EventProducer
    from freshrec.streams.replay import replay_events

    if not args.file.exists():
        raise FileNotFoundError(f"no such file: {args.file}")
    bootstrap, _ = _endpoints(settings)
    producer = EventProducer(
        bootstrap,
        settings.events_topic,
        args.events_per_message,
        config=kafka_config(settings, bootstrap),
    )
    progress = None if args.json else Progress(count_lines(args.file), f"replay {args.file.name}")
    events = read_events(args.file, args.format, args.ts_unit)
    summary = replay_events(events, producer, rate=args.rate, progress=progress)
    payload = {
        "events": summary.events,
        "messages": summary.messages,
        "unparsed_lines": summary.raw_lines,
        "seconds": round(summary.seconds, 3),
        "events_per_s": round(summary.events_per_s, 1),
        "topic": settings.events_topic,
    }
    _emit(
        args,
        payload,
        f"replayed {summary.events} events in {summary.messages} messages to "
        f"{settings.events_topic} in {summary.seconds:.1f} s "
        f"({summary.events_per_s:,.0f} events/s)",
    )
    return 0


def _synth(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.evaluation.synth import SynthConfig, generate, write_jsonl

    stream = generate(
        SynthConfig(
            users=args.users,
            items=args.items,
            events=args.events,
            seed=args.seed,
            change_at=args.change_at,
            rotate_user_share=args.rotate_user_share,
            cluster_items=args.cluster_items,
        )
    )
    write_jsonl(stream.events, args.out)
    payload = {
        "out": str(args.out),
        "events": len(stream.events),
        "users": args.users,
        "items": args.items,
        "noise_floor_rmse": round(float(stream.noise_floor_rmse()), 4),
    }
    _emit(
        args,
        payload,
        f"wrote {len(stream.events)} events to {args.out} "
        f"(rating noise floor RMSE {payload['noise_floor_rmse']})",
    )
    return 0


def _eval(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.evaluation.datasets import assume_ts_unit
    from freshrec.evaluation.prequential import format_summary, run_eval

    if not args.file.exists():
        raise FileNotFoundError(f"no such file: {args.file}")
    with assume_ts_unit(args.ts_unit):
        summary = run_eval(
            settings,
            args.file,
            mode=args.mode,
            fmt=args.format,
            out_dir=args.out,
            limit=args.limit,
            chunk=args.chunk,
            show_progress=not args.json,
            ablation=args.ablation,
            lag_s=args.lag,
            freshness_lags=_lags(args.freshness_lags) if args.freshness else (),
        )
    _emit(args, summary, format_summary(summary))
    return 0


def _lags(text: str) -> tuple[float, ...]:
    try:
        lags = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(
            f"--freshness-lags takes seconds separated by commas, got {text!r}"
        ) from None
    if not lags:
        raise ValueError("--freshness-lags is empty; give seconds such as 1,60,3600,86400")
    return lags


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    if args.soak:
        return _soak(args, settings)
    if args.target == "serve":
        from freshrec.bench.serve import format_serve_results, run_serve_bench

        rates = tuple(float(r) for r in args.rates.split(","))
        results = run_serve_bench(
            settings,
            50_000 if args.items is None else args.items,
            100_000 if args.users is None else args.users,
            rates,
            10.0 if args.seconds is None else args.seconds,
            show_progress=not args.json,
            tastes=args.tastes,
            factors_from=args.factors_from,
            readers=args.readers,
        )
        _emit(args, results, format_serve_results(results))
        return 0
    if args.target == "memory":
        from freshrec.bench.memory import format_memory, run_memory_bench

        results = run_memory_bench(
            settings,
            args.source,
            users=10_000 if args.users is None else args.users,
            items=2_000 if args.items is None else args.items,
            events=args.events,
            show_progress=not args.json,
        )
        _emit(args, results, format_memory(results))
        return 0
    from freshrec.bench.freshness import format_freshness, run_freshness
    from freshrec.bench.ingest import format_results, run_bench

    results: dict[str, Any] = {}
    text = []
    if args.target in (None, "updates"):
        results = run_bench(
            settings, events=args.events, repeat=args.repeat, show_progress=not args.json
        )
        text.append(format_results(results))
    if args.target in (None, "freshness"):
        results["freshness"] = run_freshness(
            settings,
            seconds=40.0 if args.seconds is None else args.seconds,
            serve_rps=args.serve_rps,
            show_progress=not args.json,
        )
        text.append(format_freshness(results["freshness"]))
    _emit(args, results, "\n\n".join(text))
    return 0


def _soak(args: argparse.Namespace, settings: Settings) -> int:
    """Non-zero, with the reasons on stderr, when the worker fell behind or the reader failed."""
    from freshrec.bench.soak import format_soak, run_soak

    if args.target is not None:
        raise ValueError(f"--soak runs the whole pipeline; drop the target {args.target!r}")
    results = run_soak(
        settings,
        seconds=600.0 if args.seconds is None else args.seconds,
        serve_rps=args.serve_rps,
        show_progress=not args.json,
    )
    _emit(args, results, format_soak(results))
    for failure in results["failures"]:
        print(f"freshrec: soak failed: {failure}", file=sys.stderr)
    return 0 if results["ok"] else 1


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.devenv.demo import run_demo
    from freshrec.serving.kernels import warm_up

    # Here, in the foreground, rather than inside the reader the demo starts: the first run on a
    # machine compiles the funnel's kernels (a minute or two on a small one), and the reader
    # then loads them from the cache in a second instead of spending its start-up deadline.
    if not args.json:
        print("preparing the funnel's compiled kernels (the first run compiles them) ...")
    ready = warm_up([settings.funnel_config()])
    if not args.json:
        print(ready)
    summary = run_demo(settings, events=args.events, rate=args.rate, quiet=args.json)
    if args.json:
        print(json.dumps(summary))
    return 0 if summary.get("ok") else 1


def _data(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.evaluation.fetch import fetch_dataset, find_dataset

    if args.action == "path":
        path = find_dataset(args.name, settings.home)
        _emit(args, {"name": args.name, "path": str(path)}, str(path))
        return 0

    def log(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr)

    fetched = fetch_dataset(args.name, settings.home, force=args.force, log=log)
    _emit(args, fetched.as_dict(), str(fetched.path))
    return 0


def _config(args: argparse.Namespace, settings: Settings) -> int:
    if args.markdown:
        print(Settings.markdown_reference())
        return 0
    values = settings.shown()  # secrets masked, the Redis URL's password too
    _emit(args, values, "\n".join(f"{Settings.env_name(k)}={v}" for k, v in values.items()))
    return 0


def _dashboards(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.dashboards import render_all

    written = render_all(args.prometheus, args.out, args.minutes)
    lines = [f"{w['png']}  {w['dashboard']}: {w['panels']} panels, "
             f"{w['panels_without_data']} without data" for w in written]  # fmt: skip
    _emit(args, {"dashboards": written}, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
