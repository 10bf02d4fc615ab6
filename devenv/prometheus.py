"""A local Prometheus with the project's configuration, for tests and `freshrec dashboards`.

Prometheus comes from Debian's ``prometheus`` package (which also holds ``promtool``), installed
with apt-get when it is missing and we run as root, as ``redis-server`` is; otherwise the error
says what to install. The configuration is ``deploy/prometheus.yml`` itself, with its scrape
targets (the docker-compose host names) replaced by the processes to watch and its rule files
next to it, so what is tested is what is deployed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from freshrec.devenv.processes import free_port, stop_processes, wait_for

log = logging.getLogger(__name__)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CONFIG = DEPLOY / "prometheus.yml"
RULES = DEPLOY / "prometheus"
COMPOSE_DISCOVERY = {
    "freshrec-worker": "dns_sd_configs: [{ names: [worker], type: A, port: 9464 }]",
    "freshrec-reader": 'static_configs: [{ targets: ["reader:8080"] }]',
}
"""How `CONFIG` finds each job's targets in compose (every worker replica by DNS): what
`project_config` replaces with a static target."""
INSTALL = "apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus"


class PrometheusMissing(RuntimeError):
    """Prometheus is not installed and cannot be installed here; the message says how."""


def binary(name: str = "prometheus") -> str:
    """The path of ``prometheus`` or ``promtool``, installing Debian's package if need be."""
    found = shutil.which(name)
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PrometheusMissing(
            f"`{name}` was not found; install Prometheus (Debian: sudo sh -c '{INSTALL}')"
        )
    log.warning("%s is missing; installing Debian's prometheus package with apt-get", name)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["sh", "-c", INSTALL], check=True, env=env, timeout=900)
    found = shutil.which(name)
    if found is None:
        raise PrometheusMissing(f"apt-get installed prometheus but `{name}` is still missing")
    return found


def project_config(targets: dict[str, str], workdir: Path) -> Path:
    """`CONFIG` with each job's targets replaced by ``targets[job]``, its rules beside it."""
    text = CONFIG.read_text()
    for job, discovery in COMPOSE_DISCOVERY.items():
        if discovery not in text:
            raise ValueError(f"{CONFIG} no longer finds {job}'s targets with {discovery}")
        text = text.replace(
            discovery, f"static_configs: [{{ targets: [{json.dumps(targets[job])}] }}]"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(RULES, workdir / RULES.name, dirs_exist_ok=True)
    config = workdir / CONFIG.name
    config.write_text(text)
    return config


class LocalPrometheus:
    """A Prometheus process on a free loopback port, its data in ``workdir``, until `stop`."""

    def __init__(self, config: Path, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                ],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for(self._ready, 60, f"Prometheus to be ready (log {self.log_path})")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Prometheus exited with {self.proc.returncode}:\n{tail}")
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
            return response.status == 200

    def api(self, path: str, **params: Any) -> Any:
        """The ``data`` of an HTTP API answer; raises with Prometheus's error otherwise."""
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as answer:
                body = json.loads(answer.read())
        except urllib.error.HTTPError as exc:  # a bad query: 400 with Prometheus's reason
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus refused {path} {params}: {body}")
        return body["data"]

    def stop(self) -> None:
        stop_processes([self.proc], grace_s=15)
