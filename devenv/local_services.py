"""Provide the backing services (one Kafka broker, one Redis) and stop only what we started.

Each service comes, in this order, from its ``FRESHREC_*`` address (nothing is started), from a
container when a Docker engine answers, or from a local process: Apache Kafka in KRaft mode from
jars fetched once with Maven, and ``redis-server``. ``up`` records what it started in a state
file so ``down`` stops exactly that, and never a reused pid or a system redis it did not start.
With ``FRESHREC_REDIS_CLUSTER`` and no Redis address, Redis is a local cluster of three
``redis-server`` processes (never containers, see `_start_cluster_on_free_ports`).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import fcntl
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from freshrec.settings import Settings, mask_url

log = logging.getLogger(__name__)

SERVICES = ("kafka", "redis")
PREFERRED_PORTS = {"kafka": [9092, 9093], "redis": [6379]}
CLUSTER_PORTS = [7001, 7002, 7003]  # the local Redis Cluster's nodes, first one in the URL
CLUSTER_BUS_OFFSET = 10_000  # a cluster node also listens on its port + 10000, for its peers
START_TIMEOUT_S = 90.0
REDIS_PERSISTENCE = (
    "--appendonly", "yes", "--appendfsync", "everysec",
    "--auto-aof-rewrite-percentage", "400", "--auto-aof-rewrite-min-size", "512mb",
)  # fmt: skip
"""How a redis-server freshrec starts keeps its state (``docker-compose.yml`` says the same).

The append-only file is fsynced once a second: a crash of the process loses nothing
acknowledged unless a slow disk had Redis hold back its file writes (up to 2 s while an fsync
runs), a crash of the machine the last second or two. The models write increments
(each event adds to dozens of co-occurrence and counter scores), so the file grows many times
faster than the state it describes, and each compaction is a forked child writing the whole
state, a core busy for as long. Compacting when the file has grown by P percent keeps a share
of a core busy in proportion to the write rate over P, whatever the state's size, and that
core is taken from the worker and the reader when they share the machine. At 400 (and not
below 512 MB) rather than Redis's 100, compactions run a quarter as often, for at most five
times the state on disk and a longer replay on restart."""
STOP_DEADLINE_S = 30.0
_children: dict[int, subprocess.Popen[bytes]] = {}  # our own children, so they are reaped

_JARS = (  # the broker, and log4j2 behind slf4j so it logs to a file in the service folder
    "org.apache.kafka:kafka_2.13:{version}",
    "org.slf4j:slf4j-api:2.0.17",
    "org.apache.logging.log4j:log4j-slf4j2-impl:2.24.3",
    "org.apache.logging.log4j:log4j-core:2.24.3",
)


@dataclass(frozen=True)
class Endpoints:
    kafka_bootstrap: str  # "127.0.0.1:9092"
    redis_url: str  # "redis://127.0.0.1:6379/0"
    source: str  # "env" | "docker" | "local" ("env" only when both came from the environment)


class ServiceError(RuntimeError):
    """A backing service could not be provided; the message says what to do about it."""


# --- public API --------------------------------------------------------------------------------
def resolve(
    settings: Settings, state_dir: Path | None = None, services: Sequence[str] = SERVICES
) -> tuple[Endpoints, Callable[[], None]]:
    """Endpoints for this process; `stop()` stops only what this call started (also at exit).

    Only ``services`` are provided; a service left out keeps the address in ``settings``
    unchecked (a run that needs only Redis never starts a broker).
    """
    state_dir = _state_dir(settings, state_dir)
    scratch = state_dir / f"run-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # never what `up` records
    stoppers: list[Callable[[], Any]] = []

    def stop() -> None:
        atexit.unregister(stop)
        while stoppers:
            stoppers.pop()()
        shutil.rmtree(scratch, ignore_errors=True)

    atexit.register(stop)
    try:
        with _locked(state_dir):
            state = _load(state_dir)
            state.pop("ports", None)
            endpoints = _provide(
                settings, state, scratch, False, lambda *a: stoppers.append(a[2]), services
            )
    except BaseException:
        stop()
        raise
    return endpoints, stop


def up(settings: Settings, state_dir: Path | None = None) -> Endpoints:
    """Start what is not running yet and record it; running services are found and reused."""
    state_dir = _state_dir(settings, state_dir)

    def record(service: str, started: dict[str, Any], _: Callable[[], Any]) -> None:
        state[service] = started
        if "ports" in started:
            state.setdefault("ports", {})[service] = started["ports"]
        _save(state_dir, state)  # at once, so `down` finds it even if the next one fails

    with _locked(state_dir):
        state = _load(state_dir)
        return _provide(settings, state, state_dir, True, record)


def down(settings: Settings, state_dir: Path | None = None) -> list[str]:
    """Stop what `up` recorded and wait until it is gone; returns what was stopped."""
    state_dir = _state_dir(settings, state_dir)
    stopped = []
    with _locked(state_dir):
        state = _load(state_dir)
        for service in reversed(SERVICES):
            record = state.pop(service, None)
            if record and _stop_record(record):
                stopped.append(_describe(service, record))
            _save(state_dir, state)
    return stopped


def status(
    settings: Settings, state_dir: Path | None = None, services: Sequence[str] = SERVICES
) -> dict[str, Any]:
    """What runs: per service (of ``services``) its source, pid or container, address, alive
    and answering; for a local Redis Cluster also each node's."""
    state_dir = _state_dir(settings, state_dir)
    state = _load(state_dir)
    report: dict[str, Any] = {"state_dir": str(state_dir)}
    for service in services:
        record = state.get(service) or {}
        alive: bool | None = bool(record) and _running(record)
        secured = None
        if env := _env_address(settings, service):  # not ours to see: only whether it answers
            record, alive, secured = {"source": "env", "address": env}, None, settings
        address = record.get("address") if alive is not False else None
        report[service] = {
            "source": record.get("source"),
            "pid": record.get("pid") if alive else None,
            "container_id": record.get("container_id") if alive else None,
            "address": address,
            "alive": alive,
        }
        if "nodes" in record:  # a local cluster: answering only when every node serves its slots
            nodes = [_node_status(node) for node in record["nodes"]]
            report[service] |= {"answering": all(n["answering"] for n in nodes), "nodes": nodes}
        else:
            report[service]["answering"] = bool(address) and _answers(
                service, address, 2.0, secured
            )
    return report


def start_local(
    service: str, settings: Settings, workdir: Path, ports: Sequence[int]
) -> dict[str, Any]:
    """Start a local broker (``ports``: client, controller) or redis-server (``ports``: one)
    in ``workdir`` and return its record once it answers.

    Started again on the same folder and ports after `stop_local`, it comes back with its data
    (Kafka's log dirs, Redis's append-only file when ``settings.redis_persist``) at the same
    address: what a test of a service restart needs. Nothing is recorded for `down`.
    """
    return _start_process(service, settings, Path(workdir), list(ports))


def stop_local(record: dict[str, Any], hard: bool = False) -> bool:
    """Stop what `start_local` started: SIGTERM (a clean shutdown, SIGKILL past a deadline),
    or SIGKILL at once with ``hard`` (a crash). True when something was stopped."""
    if not hard:
        return _stop_record(record)
    if "nodes" in record:
        return any([stop_local(node, hard) for node in record["nodes"]])
    if not (_alive(record["pid"]) and _ours(record)):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(record["pid"], signal.SIGKILL)  # its own session: its children go too
    deadline = time.monotonic() + 10.0
    while _alive(record["pid"]):
        if time.monotonic() > deadline:
            raise ServiceError(f"pid {record['pid']} survived SIGKILL")
        time.sleep(0.02)
    return True


def wait_for_kafka(bootstrap: str, timeout_s: float, settings: Settings | None = None) -> None:
    """Return once the broker answers a metadata request; a listening port is not enough.
    ``settings`` brings the security options of a configured broker (default: PLAINTEXT)."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from freshrec.connections import kafka_config

    deadline, last = time.monotonic() + timeout_s, "no answer"
    quiet = logging.getLogger(f"{__name__}.librdkafka")
    while (remaining := deadline - time.monotonic()) > 0:
        if not any(_port_open(a) for a in bootstrap.split(",")):
            last = "connection refused"
            time.sleep(min(0.2, remaining))
            continue
        try:
            admin = AdminClient(kafka_config(settings or Settings(), bootstrap, logger=quiet))
            if admin.list_topics(timeout=max(0.5, min(remaining, 5.0))).brokers:
                return
        except KafkaException as exc:
            last = str(exc)
    raise TimeoutError(
        f"Kafka at {bootstrap} gave no metadata within {timeout_s:.0f} s ({last}); "
        "start it with `freshrec services up` or fix FRESHREC_KAFKA_BOOTSTRAP"
    )


def wait_for_redis(
    url: str, timeout_s: float, settings: Settings | None = None, cluster: bool | None = None
) -> None:
    """Return once Redis answers PING (``settings``: the credentials and TLS options of a
    configured server) and, for a cluster (``cluster``, default ``settings.redis_cluster``),
    once this node reports ``cluster_state:ok``: a node answers PING before its slots are
    served, and commands sent then fail with CLUSTERDOWN."""
    import redis

    from freshrec.connections import redis_options

    settings = settings or Settings()
    cluster = settings.redis_cluster if cluster is None else cluster
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while deadline - time.monotonic() > 0:
        # A client of this node alone: a cluster client cannot even be built before it is ok.
        client = redis.Redis.from_url(
            url, **redis_options(settings, url), socket_connect_timeout=1.0, socket_timeout=1.0
        )
        try:
            if client.ping():
                if not cluster:
                    return
                state = _cluster_state(client)
                if state == "ok":
                    return
                last = f"cluster_state:{state}"
        except redis.RedisError as exc:
            if cluster and "cluster support disabled" in str(exc):
                raise ServiceError(
                    f"Redis at {mask_url(url)} is not a cluster node ({exc}); point "
                    "FRESHREC_REDIS_URL at a node of a Redis Cluster or unset "
                    "FRESHREC_REDIS_CLUSTER"
                ) from None
            last = str(exc)
        finally:
            client.close()
        time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))  # the poll's interval
    wanted = "report cluster_state:ok" if cluster else "answer PING"
    raise TimeoutError(
        f"Redis at {mask_url(url)} did not {wanted} within {timeout_s:.0f} s ({last}); "
        "start it with `freshrec services up` or fix FRESHREC_REDIS_URL"
    )


def _cluster_state(client: Any) -> str:
    """``cluster_state`` from CLUSTER INFO, whether redis-py parsed the reply or not."""
    info = client.execute_command("CLUSTER INFO")
    if isinstance(info, bytes | str):
        text = info.decode() if isinstance(info, bytes) else info
        info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    state = info.get("cluster_state", "unknown")
    return state.decode() if isinstance(state, bytes) else str(state)


def docker_available() -> bool:
    """True when a Docker engine answers, not merely when the client is installed."""
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def _provide(
    settings: Settings,
    state: dict[str, Any],
    workdir: Path,
    keep: bool,
    started: Callable[[str, dict[str, Any], Callable[[], Any]], None],
    services: Sequence[str] = SERVICES,
) -> Endpoints:
    """Each service from the env, else the recorded one if it answers, else a new one."""
    addresses = {"kafka": settings.kafka_bootstrap, "redis": settings.redis_url}
    sources: dict[str, str] = {}
    use_docker: bool | None = None
    for service in services:
        record = state.get(service)
        if env := _env_address(settings, service):
            record = {"source": "env", "address": env}
        elif not (record and _reusable(service, record, settings)):
            if service == "redis" and settings.redis_cluster:
                if keep and record and "nodes" in record:
                    _stop_record(record)  # the rest of a broken cluster: its nodes restart together
                wanted = state.get("ports", {}).get(service, [])
                record = _start_cluster_on_free_ports(settings, workdir, wanted)
                started(service, record, lambda r=record: _stop_record(r))
                addresses[service], sources[service] = record["address"], record["source"]
                continue
            use_docker = docker_available() if use_docker is None else use_docker
            if use_docker:
                record, container = _start_container(service, settings, keep)
                started(service, record, container.stop)
            else:
                wanted = state.get("ports", {}).get(service, [])
                record = _start_on_free_ports(service, settings, workdir, wanted)
                started(service, record, lambda r=record: _stop_record(r))
        addresses[service], sources[service] = record["address"], record["source"]
    return Endpoints(addresses["kafka"], addresses["redis"], _source(sources))


# --- records -----------------------------------------------------------------------------------
def _state_dir(settings: Settings, state_dir: Path | None) -> Path:
    path = Path(state_dir) if state_dir is not None else Path(settings.home) / "services"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise `up`/`down` across processes so two callers never start two brokers."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _load(state_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((state_dir / "state.json").read_text())
    except FileNotFoundError:
        return {}


def _save(state_dir: Path, state: dict[str, Any]) -> None:
    tmp = state_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, state_dir / "state.json")


def _env_address(settings: Settings, service: str) -> str:
    return settings.kafka_bootstrap if service == "kafka" else settings.redis_url


def _source(sources: dict[str, str]) -> str:
    return next((s for s in sources.values() if s != "env"), "env")


def _describe(service: str, record: dict[str, Any]) -> str:
    if "nodes" in record:
        what = "cluster, pids " + ", ".join(str(node["pid"]) for node in record["nodes"])
    elif "pid" in record:
        what = f"pid {record['pid']}"
    else:
        what = f"container {record['container_id']:.12}"
    return f"{service} ({what}, {record['address']})"


def _answers(
    service: str,
    address: str,
    timeout_s: float,
    settings: Settings | None = None,
    cluster: bool | None = None,
) -> bool:
    try:
        if service == "kafka":
            wait_for_kafka(address, timeout_s, settings)
        else:
            wait_for_redis(address, timeout_s, settings, cluster)
        return True
    except (TimeoutError, ServiceError):
        return False


def _record_answers(service: str, record: dict[str, Any], timeout_s: float) -> bool:
    """A recorded service answers; a cluster when every node reports cluster_state:ok."""
    if "nodes" not in record:
        return _answers(service, record["address"], timeout_s)
    deadline = time.monotonic() + timeout_s
    return all(
        _answers(service, node["address"], max(deadline - time.monotonic(), 1.0), cluster=True)
        for node in record["nodes"]
    )


def _node_status(node: dict[str, Any]) -> dict[str, Any]:
    alive = _running(node)
    answering = alive and _answers("redis", node["address"], 2.0, cluster=True)
    return {"pid": node["pid"] if alive else None, "address": node["address"], "alive": alive,
            "answering": answering}  # fmt: skip


def _reusable(service: str, record: dict[str, Any], settings: Settings) -> bool:
    """A recorded service is reused when it runs and answers; running but mute is an error, and
    so is a running single Redis where the settings ask for a cluster, or the other way."""
    if not _running(record):
        return False
    if service == "redis" and ("nodes" in record) != settings.redis_cluster:
        wanted = "a cluster" if settings.redis_cluster else "a single server"
        raise ServiceError(
            f"{_describe(service, record)} runs, but FRESHREC_REDIS_CLUSTER asks for {wanted}; "
            "run `freshrec services down` and try again"
        )
    if _record_answers(service, record, 30.0):
        return True
    raise ServiceError(
        f"{_describe(service, record)} runs but does not answer; see the logs in its folder, "
        "then run `freshrec services down` and try again"
    )


def _running(record: dict[str, Any]) -> bool:
    if "nodes" in record:
        return all(_running(node) for node in record["nodes"])
    if "pid" in record:
        return _ours(record) and _alive(record["pid"])
    return _container_running(record["container_id"])


def _stop_record(record: dict[str, Any]) -> bool:
    """Stop a recorded service if it is still ours; True when something was stopped."""
    if "nodes" in record:  # a cluster: each node that is still ours
        return any([_stop_record(node) for node in record["nodes"]])
    if "container_id" in record:
        return _remove_container(record["container_id"])
    pid = record["pid"]
    if not (_alive(pid) and _ours(record)):
        return False
    log.info("stopping pid %s (%s)", pid, record["address"])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pid:  # started in its own session: take its children too
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        deadline = time.monotonic() + (STOP_DEADLINE_S if sig == signal.SIGTERM else 10.0)
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if not _alive(pid):
            return True
        log.warning("pid %s ignored %s; escalating", pid, sig.name)
    raise ServiceError(f"pid {pid} survived SIGKILL; check it with `ps -p {pid}`")


# --- local processes ---------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    """Alive, or exiting but not yet done; reaps our own exited children."""
    if pid in _children and _children[pid].poll() is not None:
        del _children[pid]
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    # A JVM's main thread turns zombie while its other threads still shut down.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X") or threads > 1


def _ours(record: dict[str, Any]) -> bool:
    """Guard against a reused pid: the command line and folder must be the ones we started."""
    pid, workdir = record["pid"], record["workdir"]
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    if record["service"] == "kafka":
        return "kafka.Kafka" in cmdline and f"{workdir}/server.properties" in cmdline
    return "redis-server" in cmdline and cwd == workdir


def _start_process(
    service: str, settings: Settings, workdir: Path, ports: list[int], cluster: bool = False
) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    if service == "kafka":
        command, address, logs = _kafka_command(settings, workdir, *ports)
    else:
        command, address, logs = _redis_command(settings, workdir, ports[0], cluster)
    log.info("starting %s at %s in %s", service, address, workdir)
    with open(workdir / f"{service}.out", "ab") as out:
        proc = subprocess.Popen(
            command, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    _children[proc.pid] = proc
    record = {"service": service, "source": "local", "pid": proc.pid, "address": address}
    record |= {"workdir": str(workdir), "ports": ports}
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (_answers(service, address, 1.0) and proc.poll() is None):  # ours, not a squatter
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_record(record)
            tail = "\n".join(_tail(workdir / name) for name in (*logs, f"{service}.out"))
            raise ServiceError(
                f"{service} did not start at {address} (exit code {proc.returncode}); "
                f"logs in {workdir}:\n{tail}"
            )
    return record


def kafka_cluster_id(random_bytes: Callable[[], bytes] = lambda: uuid.uuid4().bytes) -> str:
    """A Kafka cluster id that the storage tool's argument parser accepts.

    Like Kafka's own `Uuid.randomUuid`, ids starting with '-' are drawn again: argparse reads
    `-t -abc...` as a missing value followed by an unknown option, one format in 64.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(random_bytes()).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _kafka_command(
    settings: Settings, workdir: Path, port: int, cport: int
) -> tuple[list[str], str, list[str]]:
    lib = _kafka_lib(settings)
    java = _require(
        "java", "a Java 17+ runtime (Debian: apt-get install -y openjdk-17-jre-headless)"
    )
    data, props = workdir / "data", workdir / "server.properties"
    log4j = workdir / "log4j2.properties"
    props.write_text(
        "process.roles=broker,controller\nnode.id=1\n"
        f"controller.quorum.bootstrap.servers=127.0.0.1:{cport}\n"
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n"
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n"
        "controller.listener.names=CONTROLLER\ninter.broker.listener.name=PLAINTEXT\n"
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n"
        f"log.dirs={data}\nnum.partitions=1\n"
        "offsets.topic.replication.factor=1\n"
        "transaction.state.log.replication.factor=1\ntransaction.state.log.min.isr=1\n"
        "share.coordinator.state.topic.replication.factor=1\n"
        "share.coordinator.state.topic.min.isr=1\n"
        "group.initial.rebalance.delay.ms=0\n"
        "auto.create.topics.enable=false\ndelete.topic.enable=true\n"
    )
    log4j.write_text(
        "rootLogger.level=INFO\nrootLogger.appenderRef.file.ref=file\n"
        "appender.file.type=File\nappender.file.name=file\n"
        f"appender.file.fileName={workdir}/kafka.log\n"
        "appender.file.layout.type=PatternLayout\nappender.file.layout.pattern=[%d] %p %m (%c)%n\n"
    )
    common = [f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{lib}/*"]
    if not (data / "meta.properties").exists():
        cluster_id = kafka_cluster_id()
        format_cmd = [java, *common, "kafka.tools.StorageTool", "format", "--standalone"]
        done = subprocess.run(
            [*format_cmd, "-t", cluster_id, "-c", str(props)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if done.returncode != 0:
            raise ServiceError(
                f"formatting Kafka storage in {data} failed: {done.stdout}{done.stderr}\n"
                f"remove {data} and try again"
            )
    heap = ["-Xms256m", "-Xmx512m", "-XX:+UseG1GC"]
    return [java, *heap, *common, "kafka.Kafka", str(props)], f"127.0.0.1:{port}", ["kafka.log"]


def _kafka_lib(settings: Settings) -> Path:
    """Fetch the broker jars once; a marker file tells a complete download from a partial one."""
    root = Path(settings.home) / f"kafka-{settings.kafka_version}"
    lib, marker = root / "lib", root / "lib.complete"
    with _locked(root):
        if marker.exists():
            return lib
        mvn = _require("mvn", "Maven (Debian: apt-get install -y maven)")
        _require("java", "a Java 17+ runtime (Debian: apt-get install -y openjdk-17-jre-headless)")
        shutil.rmtree(lib, ignore_errors=True)
        deps = "".join(
            "<dependency><groupId>{}</groupId><artifactId>{}</artifactId><version>{}</version>"
            "</dependency>\n".format(*jar.format(version=settings.kafka_version).split(":"))
            for jar in _JARS
        )
        (root / "pom.xml").write_text(
            '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>\n'
            "<groupId>freshrec</groupId><artifactId>kafka-runtime</artifactId><version>1</version>\n"
            f"<dependencies>\n{deps}</dependencies></project>\n"
        )
        log.info("fetching Kafka %s jars into %s (once)", settings.kafka_version, lib)
        done = subprocess.run(
            [mvn, "-q", "-B", "dependency:copy-dependencies", "-DoutputDirectory=lib",
             "-DincludeScope=runtime"],
            cwd=root, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if done.returncode != 0:
            raise ServiceError(
                f"Maven could not fetch Kafka {settings.kafka_version} "
                f"(exit {done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}\n"
                "check access to Maven Central and that FRESHREC_KAFKA_VERSION is a release"
            )
        marker.write_text(settings.kafka_version)
        return lib


def _redis_command(
    settings: Settings, workdir: Path, port: int, cluster: bool = False
) -> tuple[list[str], str, list[str]]:
    binary = _redis_server_binary()
    # The append-only file lives in the service folder (--dir): a restarted redis-server comes
    # back with the learned state (see REDIS_PERSISTENCE).
    command = [
        binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir), "--save", "",
        *(REDIS_PERSISTENCE if settings.redis_persist else ("--appendonly", "no")),
        "--daemonize", "no", "--logfile", str(workdir / "redis.log"),
    ]  # fmt: skip
    if cluster:  # nodes.conf in the folder too: a restarted node knows its cluster again
        command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "5000"]  # fmt: skip
    return command, f"redis://127.0.0.1:{port}/0", ["redis.log"]


def _redis_server_binary() -> str:
    """``redis-server``, installed with apt-get when missing and we may (its package brings
    ``redis-cli`` too)."""
    binary = shutil.which("redis-server")
    if binary is None:
        install = "apt-get update -qq && apt-get install -y -qq redis-server"
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise ServiceError(
                f"redis-server is not installed; install it (Debian: sudo sh -c '{install}') "
                "or set FRESHREC_REDIS_URL to a running Redis"
            )
        log.warning("redis-server is missing; installing it with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["sh", "-c", install], check=True, env=env, timeout=900)
        binary = _require("redis-server", "redis-server (Debian: apt-get install -y redis-server)")
    return binary


def _start_cluster_on_free_ports(
    settings: Settings, workdir: Path, wanted: list[int]
) -> dict[str, Any]:
    """`_start_cluster` on the recorded ports, else the usual ones, else free ones (each with
    its bus port); once more on other free ports if another process took a chosen port between
    the check and a node's bind.

    Always local processes, even when Docker answers: nodes in containers tell clients their
    container addresses (in CLUSTER SLOTS and MOVED replies), which the host cannot reach
    unless each node announces a host address and port (cluster-announce-*) mapped one to one.
    """
    ports = _choose_ports(wanted, CLUSTER_PORTS, _cluster_ports_free, _free_cluster_ports)
    try:
        return _start_cluster(settings, workdir / "redis", ports)
    except ServiceError:
        if _cluster_ports_free(ports):
            raise  # the cluster failed on its own, not for want of its ports
        log.warning("redis cluster: a port of %s taken meanwhile; starting on other ports", ports)
        return _start_cluster(settings, workdir / "redis", _free_cluster_ports(len(ports)))


def _cluster_ports_free(ports: Sequence[int]) -> bool:
    """Each port and its cluster bus port (port + 10000) free."""
    return all(_port_free(p) and _port_free(p + CLUSTER_BUS_OFFSET) for p in ports)


def _free_cluster_ports(n: int) -> list[int]:
    """``n`` ports free with their bus ports, no higher than Redis allows a cluster node
    (its bus port must fit below 65536)."""
    rng = random.Random()
    found: list[int] = []
    for _ in range(1000):
        port = rng.randrange(20_000, 65_536 - CLUSTER_BUS_OFFSET)
        if port not in found and _cluster_ports_free([port]):
            found.append(port)
            if len(found) == n:
                return found
    raise ServiceError("no free ports for a local Redis Cluster (each node needs port + 10000)")


def _start_cluster(settings: Settings, folder: Path, ports: list[int]) -> dict[str, Any]:
    """One cluster node per port, each in its own sub-folder of ``folder``, serving all 16384
    slots; returns its record once every node reports cluster_state:ok.

    With ``settings.redis_persist`` and folders that hold a joined cluster, the nodes start as
    they are and rejoin by themselves (nodes.conf), with their data (append-only files).
    Otherwise the folders are emptied and the cluster created anew: `redis-cli --cluster
    create` accepts only empty nodes that know no other.
    """
    folders = [folder / f"node-{port}" for port in ports]
    rejoin = settings.redis_persist and all(_joined(f, len(ports)) for f in folders)
    if not rejoin:
        for node_folder in folders:
            shutil.rmtree(node_folder, ignore_errors=True)
    nodes: list[dict[str, Any]] = []
    record = {"service": "redis", "source": "local", "address": f"redis://127.0.0.1:{ports[0]}/0"}
    record |= {"workdir": str(folder), "ports": list(ports), "nodes": nodes}
    log.info("starting a redis cluster on ports %s in %s", ports, folder)
    try:
        for node_folder, port in zip(folders, ports, strict=True):
            nodes.append(_start_process("redis", settings, node_folder, [port], cluster=True))
        if not rejoin:
            _create_cluster(ports)
        deadline = time.monotonic() + START_TIMEOUT_S
        for node in nodes:
            wait_for_redis(node["address"], max(deadline - time.monotonic(), 1.0), cluster=True)
    except TimeoutError as exc:
        _stop_record(record)
        tail = "\n".join(_tail(f / "redis.log", 5) for f in folders)
        raise ServiceError(
            f"the redis cluster did not form: {exc}; logs in {folder}:\n{tail}"
        ) from None
    except BaseException:
        _stop_record(record)
        raise
    return record


def _joined(folder: Path, nodes: int) -> bool:
    """The node in ``folder`` was part of a created cluster: its nodes.conf lists ``nodes``
    nodes (a node writes the file as soon as it starts, knowing only itself)."""
    try:
        lines = (folder / "nodes.conf").read_text().splitlines()
    except FileNotFoundError:
        return False
    return sum(1 for line in lines if line.strip() and not line.startswith("vars ")) >= nodes


def _create_cluster(ports: list[int]) -> None:
    """Spread the slots over the (empty) nodes on ``ports``, primaries only, and join them."""
    cli = _require("redis-cli", "redis-cli (Debian: apt-get install -y redis-tools)")
    addresses = [f"127.0.0.1:{port}" for port in ports]
    try:
        done = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=START_TIMEOUT_S, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ServiceError(
            f"`redis-cli --cluster create` gave no answer within {START_TIMEOUT_S:.0f} s"
        ) from None
    if done.returncode != 0:
        raise ServiceError(
            f"`redis-cli --cluster create` failed (exit {done.returncode}):\n"
            f"{(done.stdout + done.stderr)[-2000:]}"
        )


def _require(program: str, what: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise ServiceError(
            f"`{program}` was not found; install {what}, or set FRESHREC_* addresses"
        )
    return path


def _start_on_free_ports(
    service: str, settings: Settings, workdir: Path, wanted: list[int]
) -> dict[str, Any]:
    """`_start_process` on `_choose_ports`; once more on other free ports if another process
    took a chosen port between the check and the server's bind (two runs starting at once)."""
    ports = _choose_ports(wanted, PREFERRED_PORTS[service])
    try:
        return _start_process(service, settings, workdir / service, ports)
    except ServiceError:
        if all(_port_free(p) for p in ports):
            raise  # the service failed on its own, not for want of its port
        log.warning("%s: port %s taken meanwhile; starting on other ports", service, ports)
        others = _any_free_ports(len(ports))
        return _start_process(service, settings, workdir / f"{service}-{others[0]}", others)


def _choose_ports(
    wanted: Sequence[int],
    preferred: Sequence[int],
    free: Callable[[Sequence[int]], bool] = lambda ports: all(map(_port_free, ports)),
    any_free: Callable[[int], list[int]] = lambda n: _any_free_ports(n),
) -> list[int]:
    """Recorded ports, else the usual ones, else any free ones: never a port something holds
    (``free`` says whether ports are, ``any_free`` finds others)."""
    for ports in (wanted, preferred):
        if len(ports) == len(preferred) and free(ports):
            return list(ports)
    return any_free(len(preferred))


def _any_free_ports(n: int) -> list[int]:
    """``n`` ports the kernel hands out as free now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind(("127.0.0.1", port))  # fails while anything listens there, 0.0.0.0 included
        except OSError:
            return False
    return True


def _port_open(address: str) -> bool:
    host, _, port = address.strip().rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except (OSError, ValueError):
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


# --- containers --------------------------------------------------------------------------------
def _start_container(service: str, settings: Settings, keep: bool) -> tuple[dict[str, Any], Any]:
    """Start a container; `keep` turns Ryuk off so it outlives this process (for `up`)."""
    from testcontainers.core.config import testcontainers_config

    previous = testcontainers_config.ryuk_disabled
    testcontainers_config.ryuk_disabled = keep or previous
    container: Any = None
    try:
        if service == "kafka":
            from testcontainers.community.kafka import KafkaContainer

            container = KafkaContainer(_confluent_image(settings.kafka_version)).with_kraft()
            for name in ("TRANSACTION_STATE_LOG", "SHARE_COORDINATOR_STATE_TOPIC"):
                container.with_env(f"KAFKA_{name}_REPLICATION_FACTOR", "1")
                container.with_env(f"KAFKA_{name}_MIN_ISR", "1")
            container.with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
            container.start(timeout=int(START_TIMEOUT_S))
            address = container.get_bootstrap_server()
            wait_for_kafka(address, START_TIMEOUT_S)
        else:
            from testcontainers.community.redis import RedisContainer

            container = RedisContainer("redis:7")
            if settings.redis_persist:
                container.with_command(" ".join(("redis-server", *REDIS_PERSISTENCE)))
            container.start()
            host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
            address = f"redis://{host}:{port}/0"
    except Exception as exc:
        if container is not None and container.get_wrapped_container() is not None:
            container.stop()
        raise ServiceError(f"the {service} container did not start: {exc}") from exc
    finally:
        testcontainers_config.ryuk_disabled = previous
    record = {"service": service, "source": "docker", "address": address}
    record["container_id"] = container.get_wrapped_container().id
    log.info("started %s", _describe(service, record))
    return record, container


def _confluent_image(kafka_version: str) -> str:
    """The Confluent Platform image carrying this Kafka (CP 8.N ships Apache Kafka 4.N)."""
    major, minor = kafka_version.split(".")[:2]
    if major != "4":
        raise ServiceError(f"no container image known for Kafka {kafka_version}; use a 4.x version")
    return f"confluentinc/cp-kafka:8.{minor}.0"


def _container_running(container_id: str) -> bool:
    import docker

    try:
        return docker.from_env().containers.get(container_id).status == "running"
    except docker.errors.DockerException:
        return False


def _remove_container(container_id: str) -> bool:
    import docker

    try:
        docker.from_env().containers.get(container_id).remove(force=True)
        return True
    except docker.errors.NotFound:
        return False
