"""docker-compose.yml against the contract: what it publishes, where state lives, how the
freshrec services are configured, restarted and scaled, and what Prometheus scrapes.

Pure: the file is read with PyYAML and its ``${VAR}`` references are resolved here as compose
resolves them. `docker compose config` runs too, where a compose client is installed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from freshrec.devenv.local_services import REDIS_PERSISTENCE
from freshrec.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: pip install pyyaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"

SERVICES = {"kafka", "redis", "topics", "worker", "reader", "prometheus", "grafana"}
LONG_RUNNING = ("kafka", "redis", "worker", "reader", "prometheus", "grafana")
PUBLISHED = {"reader", "grafana"}
RESTART_POLICIES = ("unless-stopped", "always", "on-failure")
PASSWORD = "the-redis-password-of-this-test"
KNOWN_SETTINGS = {f.metadata["env"] for f in dataclasses.fields(Settings)}
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


class MissingVariable(ValueError):
    """A ``${NAME:?message}`` reference to a variable that is not set."""


def _interpolate(value: Any, environ: dict[str, str]) -> Any:
    """``value`` with every ``${NAME}``, ``${NAME:-default}``, ``${NAME:?message}`` and ``$$``
    replaced as compose does it (with ``-``/``?``, an empty value counts only without ``:``)."""
    if isinstance(value, dict):
        return {key: _interpolate(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, environ) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.groups()
        found = environ.get(name)
        missing = found is None or (found == "" and operator is not None and ":" in operator)
        if missing and operator and operator.endswith("?"):
            raise MissingVariable(f"{name}: {argument}")
        if missing and operator and operator.endswith("-"):
            return argument
        return found or ""

    return _VARIABLE.sub(substitute, value)


def _load(environ: dict[str, str]) -> dict[str, Any]:
    return _interpolate(yaml.safe_load(COMPOSE.read_text()), environ)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load({"FRESHREC_REDIS_PASSWORD": PASSWORD})


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's ``environment``, in either of compose's forms, as strings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def _settings(service: dict[str, Any]) -> Settings:
    """What a freshrec process in ``service`` reads; unknown or malformed values raise here."""
    return Settings.from_env(_environment(service))


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(arg) for arg in command]


def _option(args: list[str], name: str) -> str | None:
    """The value after ``name`` in a command line, None without the option."""
    return args[args.index(name) + 1] if name in args[:-1] else None


def _host_ip(port: str | int | dict[str, Any]) -> str:
    """The host address a port mapping binds; "" for every interface."""
    if isinstance(port, dict):
        return str(port.get("host_ip", ""))
    parts = str(port).split(":")
    return ":".join(parts[:-2]) if len(parts) > 2 else ""


def _container_port(port: str | int | dict[str, Any]) -> int:
    if isinstance(port, dict):
        return int(port["target"])
    return int(str(port).split(":")[-1].split("/")[0])


def _named_volume_at(compose: dict[str, Any], service: str, target: str) -> str | None:
    """The named volume ``service`` mounts at ``target``; None for none, or a host folder."""
    for volume in compose["services"][service].get("volumes", []):
        if isinstance(volume, dict):
            source, mounted = volume.get("source"), volume.get("target")
        else:
            source, mounted = [*str(volume).split(":"), ""][:2]
        if mounted == target and source in (compose.get("volumes") or {}):
            return source
    return None


def _freshrec_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services that run the image built from this repository."""
    return {name: service for name, service in services.items() if "build" in service}


# --- what runs ---------------------------------------------------------------------------------
def test_the_stack_has_kafka_redis_topics_workers_reader_prometheus_and_grafana(
    services: dict[str, dict[str, Any]],
) -> None:
    assert set(services) >= SERVICES, SERVICES - set(services)
    assert {"topics", "worker", "reader"} <= set(_freshrec_services(services))


def test_the_broker_is_the_kafka_version_run_locally(
    services: dict[str, dict[str, Any]],
) -> None:
    image, _, version = services["kafka"]["image"].partition(":")
    assert (image, version) == ("apache/kafka", Settings().kafka_version)
    assert _environment(services["kafka"]).get("KAFKA_PROCESS_ROLES") == "broker,controller"


# --- what is reachable from the host -----------------------------------------------------------
def test_only_the_reader_and_grafana_are_published_and_only_on_the_loopback(
    services: dict[str, dict[str, Any]],
) -> None:
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == PUBLISHED
    for name in published:
        for port in services[name]["ports"]:
            assert _host_ip(port) == "127.0.0.1", (name, port)
    assert not [name for name, s in services.items() if s.get("network_mode") == "host"]


def test_the_published_ports_are_the_ones_the_reader_and_grafana_listen_on(
    services: dict[str, dict[str, Any]],
) -> None:
    reader = [_container_port(port) for port in services["reader"]["ports"]]
    assert reader == [_settings(services["reader"]).serve_port]
    assert [_container_port(port) for port in services["grafana"]["ports"]] == [3000]


# --- configuration -----------------------------------------------------------------------------
def test_every_freshrec_variable_the_file_names_is_a_known_setting() -> None:
    named = set(re.findall(r"\bFRESHREC_[A-Z0-9_]+", COMPOSE.read_text()))
    assert named, "the freshrec services are configured through FRESHREC_* settings"
    assert named <= KNOWN_SETTINGS, sorted(named - KNOWN_SETTINGS)


def test_each_freshrec_service_reaches_kafka_and_redis_by_their_compose_names(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in _freshrec_services(services).items():
        settings = _settings(service)
        assert settings.kafka_bootstrap.rpartition(":")[0] == "kafka", name
        assert re.fullmatch(r"redis://redis(:\d+)?(/\d+)?", settings.redis_url), name
        assert settings.redis_password == PASSWORD, name


def test_the_worker_and_the_reader_listen_beyond_their_own_container(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in ("worker", "reader"):
        assert _settings(services[name]).serve_host == "0.0.0.0", name


# --- Redis and Kafka state ---------------------------------------------------------------------
def test_redis_demands_the_password_and_keeps_an_append_only_file(
    services: dict[str, dict[str, Any]],
) -> None:
    command = _command(services["redis"])
    assert _option(command, "--requirepass") == PASSWORD
    assert _option(command, "--appendonly") == "yes"


def test_redis_persists_as_the_local_services_start_it(
    services: dict[str, dict[str, Any]],
) -> None:
    """The append-only file's fsync and compaction policy is the one `freshrec services up`
    gives redis-server (`REDIS_PERSISTENCE`), so the stack measured is the stack deployed."""
    command = _command(services["redis"])
    options = dict(zip(REDIS_PERSISTENCE[::2], REDIS_PERSISTENCE[1::2], strict=True))
    assert {name: _option(command, name) for name in options} == options


def test_the_redis_password_has_no_default_in_the_file() -> None:
    with pytest.raises(MissingVariable, match="FRESHREC_REDIS_PASSWORD"):
        _load({})
    with pytest.raises(MissingVariable, match="FRESHREC_REDIS_PASSWORD"):
        _load({"FRESHREC_REDIS_PASSWORD": ""})


def test_kafka_and_redis_keep_their_data_in_named_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    log_dirs = _environment(services["kafka"]).get("KAFKA_LOG_DIRS", "")
    assert log_dirs, "Kafka's data folder is set, so a volume can be mounted there"
    assert _named_volume_at(compose, "kafka", log_dirs), log_dirs
    assert _named_volume_at(compose, "redis", "/data")  # the redis image's working folder


# --- restarts and scaling ----------------------------------------------------------------------
def test_long_running_services_restart_and_the_one_shot_does_not(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in LONG_RUNNING:
        assert str(services[name].get("restart", "no")).startswith(RESTART_POLICIES), name
    assert services["topics"].get("restart", "no") == "no"


def test_the_worker_scales_without_a_host_port_or_a_container_name(
    services: dict[str, dict[str, Any]],
) -> None:
    worker = services["worker"]
    assert "ports" not in worker
    assert "container_name" not in worker


# --- monitoring --------------------------------------------------------------------------------
def _scrape_jobs() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(PROMETHEUS.read_text())
    return {job["job_name"]: job for job in config["scrape_configs"]}


def _scraped(job: dict[str, Any]) -> set[tuple[str, int, str]]:
    """(host, port, how) of every target of a scrape job: "static" or "dns-a"."""
    found = set()
    for static in job.get("static_configs", []):
        for target in static["targets"]:
            host, _, port = target.rpartition(":")
            found.add((host, int(port), "static"))
    for dns in job.get("dns_sd_configs", []):
        how = "dns-a" if dns.get("type", "SRV") in ("A", "AAAA") else "dns-srv"
        found.update((name, int(dns.get("port", 0)), how) for name in dns["names"])
    return found


def test_prometheus_runs_with_the_projects_configuration(
    services: dict[str, dict[str, Any]],
) -> None:
    mounts = [str(volume).split(":")[:2] for volume in services["prometheus"]["volumes"]]
    assert ["./deploy/prometheus.yml", "/etc/prometheus/prometheus.yml"] in mounts


def test_prometheus_finds_every_worker_replica_and_the_reader_by_compose_names(
    services: dict[str, dict[str, Any]],
) -> None:
    scraped = set().union(*(_scraped(job) for job in _scrape_jobs().values()))
    assert {host for host, _, _ in scraped} <= set(services), scraped
    worker_port = _settings(services["worker"]).worker_metrics_port
    # A static "worker:PORT" reaches one replica (another at each scrape); DNS lists them all.
    assert ("worker", worker_port, "dns-a") in scraped, scraped
    assert ("reader", _settings(services["reader"]).serve_port, "static") in scraped, scraped


# --- compose's own reading ---------------------------------------------------------------------
def _compose_client() -> list[str]:
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("no compose client on PATH (`docker compose` or `docker-compose`)")


def _compose_config(client: list[str], tmp_path: Path, password: str | None) -> Any:
    """`compose config` on the file, with an empty env file (not the developer's .env) and
    the password set in the environment or not."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    if password is not None:
        environ["FRESHREC_REDIS_PASSWORD"] = password
    command = [*client, "--project-directory", str(ROOT), "-f", str(COMPOSE)]
    command += ["--env-file", str(env_file), "--profile", "cli", "config", "--quiet"]
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=120)


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    checked = _compose_config(_compose_client(), tmp_path, PASSWORD)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_docker_compose_refuses_the_file_without_the_redis_password(tmp_path: Path) -> None:
    checked = _compose_config(_compose_client(), tmp_path, None)
    assert checked.returncode != 0
    assert "FRESHREC_REDIS_PASSWORD" in checked.stdout + checked.stderr
