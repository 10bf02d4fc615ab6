"""Child processes of freshrec's tools, and the probes that tell when they are ready.

The demo, ``freshrec eval`` in pipeline mode, the benchmarks and the integration tests all run
workers and readers as real processes: each in a session of its own (so a stop reaches its
children too), with its output in a log file, stopped with SIGTERM and, past a grace period,
SIGKILL. Waiting is always on a condition with a deadline, and fails early, naming the log,
when a process it depends on has exited (unless the process is one to start again after
that exit, as a supervisor would: `Children.start`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, TypeVar

from freshrec.settings import Settings

T = TypeVar("T")
STOP_GRACE_S = 30.0


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_freshrec(
    args: Sequence[str],
    settings: Settings,
    log_path: Path,
    *,
    module: str = "freshrec.cli",
    cwd: Path | None = None,
    append: bool = False,
) -> subprocess.Popen[bytes]:
    """``python -m module *args`` with ``settings`` in its environment, output to ``log_path``
    (after what it holds when ``append``)."""
    with log_path.open("ab" if append else "wb") as log:  # the child keeps its own handle
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env={**os.environ, **settings.environ()},
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to every process group at once, then SIGKILL to what outlives ``grace_s``."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_for(
    condition: Callable[[], T],
    timeout_s: float,
    what: str,
    *,
    poll_s: float = 0.05,
    check: Callable[[], None] | None = None,
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    A condition that raises counts as not yet (a service may refuse while it starts); its last
    error is in the timeout's message. ``check`` runs before each poll and may raise to stop
    waiting at once, for example when a process the condition depends on has exited.
    """
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        if check is not None:
            check()
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout_s:.0f} s waiting for {what} (last error: {last_error})"
            )
        time.sleep(poll_s)


class Children:
    """The freshrec processes of one run, each logging to ``logs/<name>.log``.

    Examples
    --------
    >>> import tempfile
    >>> children = Children(Path(tempfile.mkdtemp()), Settings())
    >>> _ = children.start("help", ["--help"])
    >>> children.wait(lambda: False, 60, "what an exited process will never give")
    Traceback (most recent call last):
    ...
    RuntimeError: the help process exited early with code 0; log ...
    >>> children.log("help").read_text().split()[:2]
    ['usage:', 'freshrec']
    >>> children.stop()
    """

    def __init__(self, logs: Path, settings: Settings) -> None:
        self.logs = logs
        self.settings = settings
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # name -> (restarts allowed, the statuses restarted, how to start it again)
        self._restart: dict[str, tuple[int, frozenset[int], Callable[[], Any]]] = {}
        self.restarts: dict[str, list[int]] = {}  # name -> the exit status of each restart

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        settings: Settings | None = None,
        module: str = "freshrec.cli",
        cwd: Path | None = None,
        restarts: int = 0,
        restart_on: Collection[int] = (),
    ) -> subprocess.Popen[bytes]:
        """Start process ``name``. `check` starts it again (its log goes on) each time it has
        exited with a status in ``restart_on``, ``restarts`` times at most: a supervisor's
        restart policy, for a process that exits in order to recover."""
        settings = settings or self.settings

        def launch(append: bool = False) -> subprocess.Popen[bytes]:
            log = self.log(name)
            return start_freshrec(args, settings, log, module=module, cwd=cwd, append=append)

        self.procs[name] = proc = launch()
        self.restarts[name] = []
        self._restart[name] = (restarts, frozenset(restart_on), lambda: launch(append=True))
        return proc

    def check(self) -> None:
        """Raise, with the end of its log, if a started process has exited (and is not to be
        started again)."""
        for name, proc in self.procs.items():
            status = proc.poll()
            if status is None:
                continue
            budget, statuses, launch = self._restart[name]
            if status in statuses and len(self.restarts[name]) < budget:
                self.restarts[name].append(status)
                self.procs[name] = launch()
                continue
            raise self.exited(name)

    def exited(self, name: str, problem: str = "") -> RuntimeError:
        """The error for process ``name``: what went wrong and the end of its log."""
        proc, log = self.procs[name], self.log(name)
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        problem = problem or f"exited early with code {proc.returncode}"
        return RuntimeError(f"the {name} process {problem}; log {log}:\n{tail}")

    def wait(self, condition: Callable[[], T], timeout_s: float, what: str) -> T:
        """`wait_for` that fails at once when one of these processes has exited."""
        return wait_for(condition, timeout_s, f"{what}; logs in {self.logs}", check=self.check)

    def stop(self, name: str | None = None) -> None:
        """Stop one process, or all of them."""
        if name is None:
            stop_processes(list(self.procs.values()))
            self.procs.clear()
        else:
            stop_processes([self.procs.pop(name)])


def http_json(url: str, timeout_s: float = 5.0) -> tuple[int, Any]:
    """Status and JSON body of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def group_is_consuming(
    bootstrap: str, group: str, admin: Any = None, settings: Settings | None = None
) -> bool:
    """Whether a consumer group is stable with partitions assigned: a worker that consumes.
    ``settings`` brings the security options of a configured broker."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from freshrec.connections import kafka_config

    if admin is None:  # not `admin or ...`: a client with an empty queue is falsy (__len__)
        admin = AdminClient(kafka_config(settings or Settings(), bootstrap, log_level=3))
    try:
        found = admin.describe_consumer_groups([group], request_timeout=5)[group].result()
    except KafkaException:
        return False
    return str(found.state).endswith("STABLE") and any(
        m.assignment and m.assignment.topic_partitions for m in found.members
    )
