"""Credentials and certificates, against a broker that speaks only SASL_SSL and a Redis that
speaks only TLS to one ACL user.

Injected: a Kafka broker whose one client listener is SASL_SSL (SCRAM-SHA-256/512 and PLAIN,
client certificates required) and a redis-server on a TLS port only, its default user off and
one ACL user, with certificates made for the test. Checked: the whole pipeline (producer ->
Faust worker -> Redis -> reader -> published lists) works with the right credentials; a wrong
password or an untrusted certificate stops `freshrec worker` and `freshrec serve` within
seconds with a message that names the setting to fix; no secret appears in any log or in
`freshrec config`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from freshrec.connections import (
    CredentialsRejected,
    check_kafka,
    kafka_config,
    redis_sync_client,
)
from freshrec.settings import Settings
from freshrec.store.keys import Keys
from freshrec.streams.producer import EventProducer
from freshrec.streams.recommendations_consumer import RecommendationsConsumer
from freshrec.streams.topics import delete_topics, ensure_topics, topic_specs
from tests.secured_services import SecuredKafka, SecuredRedis, make_certificates
from tests.support import (
    free_port,
    freshrec_process,
    group_is_consuming,
    http_json,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.integration

KAFKA_PASSWORD = "kafka-Secret-4b1d9e"
REDIS_PASSWORD = "redis-Secret-8c2f7a"
WRONG_PASSWORD = "wrong-Secret-0e6b35"
SECRETS = (KAFKA_PASSWORD, REDIS_PASSWORD, WRONG_PASSWORD)
NOW = time.time()


@dataclasses.dataclass(frozen=True)
class Secured:
    settings: Settings  # the right credentials, unique topic and key prefixes
    ca: Path


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    folder = Path(tempfile.mkdtemp(prefix="freshrec-auth-"))
    certs = make_certificates(folder / "certs")
    redis_server = SecuredRedis(folder / "redis", certs, "freshrec", REDIS_PASSWORD)
    broker = SecuredKafka(folder / "kafka", certs, {"freshrec": KAFKA_PASSWORD}, Settings())
    try:
        redis_server.start()
        broker.start()
        tag = uuid.uuid4().hex[:8]
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            kafka_security_protocol="SASL_SSL",
            kafka_sasl_mechanism="SCRAM-SHA-256",
            kafka_sasl_username="freshrec",
            kafka_sasl_password=KAFKA_PASSWORD,
            kafka_ssl_cafile=str(certs.ca),
            kafka_ssl_certfile=str(certs.client_cert),
            kafka_ssl_keyfile=str(certs.client_key),
            redis_url=redis_server.url,
            redis_username="freshrec",
            redis_password=REDIS_PASSWORD,
            redis_ssl_ca_certs=str(certs.ca),
            redis_ssl_certfile=str(certs.client_cert),
            redis_ssl_keyfile=str(certs.client_key),
            topic_prefix=f"auth-{tag}",
            key_prefix=f"auth-{tag}",
            partitions=2,
            worker_metrics_port=0,
            batch_within_s=0.02,
            publish_interval_s=0.1,
        )
        check_kafka(settings, timeout_s=60)  # the listener answers before SASL is ready
        ensure_topics(settings.kafka_bootstrap, settings)
        yield Secured(settings, certs.ca)
        delete_topics(settings.kafka_bootstrap, list(topic_specs(settings)), settings=settings)
    finally:
        broker.stop()
        redis_server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _event(user: str, item: str, offset_s: float) -> dict:
    return {"type": "click", "user_id": user, "item_id": item, "ts": NOW - 3600 + offset_s}


def _assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a password appears in {where}"


def test_the_pipeline_runs_on_sasl_scram_over_tls_and_redis_acl_over_tls(
    secured: Secured, tmp_path: Path
) -> None:
    settings = secured.settings
    worker = freshrec_process(
        ["--log-level", "info", "worker", "--loglevel", "info"], settings, tmp_path / "worker.log"
    )
    reader: subprocess.Popen[bytes] | None = None
    admin = AdminClient(kafka_config(settings, log_level=3))
    published = RecommendationsConsumer(
        settings.kafka_bootstrap,
        settings.recommendations_topic,
        group=f"auth-test-{uuid.uuid4().hex[:6]}",
        from_beginning=True,
        config=kafka_config(settings),
    )
    group = f"{settings.topic_prefix}-worker"
    try:
        wait_until(
            lambda: (
                worker.poll() is not None
                or group_is_consuming(settings.kafka_bootstrap, group, admin)
            ),
            90,
            "the worker to join its consumer group over SASL_SSL",
        )
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        port = free_port()
        reader = freshrec_process(
            ["--log-level", "info", "serve", "--port", str(port)], settings, tmp_path / "reader.log"
        )
        base = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: reader.poll() is not None or http_json(base + "/healthz")[0] == 200,
            60,
            "the reader to answer /healthz over Redis TLS",
        )
        assert reader.poll() is None, (tmp_path / "reader.log").read_text()[-3000:]
        crowd = []
        for n in range(6):
            crowd += [
                _event(f"crowd-{n}", "anchor", n),
                _event(f"crowd-{n}", "pair-a", n + 0.1),
            ]
        with EventProducer(
            settings.kafka_bootstrap, settings.events_topic, 10, kafka_config(settings)
        ) as producer:
            producer.send_many([*crowd, _event("alice", "anchor", 20)])

        def alice_gets_pair_a() -> bool:
            status, body = http_json(f"{base}/recommendations/alice?k=10")
            return status == 200 and "pair-a" in [i["item_id"] for i in body["items"]]

        wait_until(alice_gets_pair_a, 60, "alice's list, learned through Redis over TLS")
        store = redis_sync_client(settings)
        assert store.zscore(Keys(settings.key_prefix).neighbours("anchor"), "pair-a")
        store.close()

        def published_for_alice() -> bool:
            update = published.poll(0.5)
            return update is not None and update.user_id == "alice"

        wait_until(published_for_alice, 60, "a list for alice published over SASL_SSL")
    finally:
        published.close()
        if reader is not None:
            stop_process(reader)
        stop_process(worker)
    for name in ("worker.log", "reader.log"):
        _assert_no_secret((tmp_path / name).read_text(errors="replace"), name)


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_each_sasl_mechanism_is_accepted(secured: Secured, mechanism: str) -> None:
    check_kafka(dataclasses.replace(secured.settings, kafka_sasl_mechanism=mechanism))


@pytest.mark.parametrize(
    ("change", "command", "named"),
    [
        ({"kafka_sasl_password": WRONG_PASSWORD}, "worker", "FRESHREC_KAFKA_SASL_PASSWORD"),
        ({"kafka_sasl_password": WRONG_PASSWORD}, "serve", "FRESHREC_KAFKA_SASL_PASSWORD"),
        ({"redis_password": WRONG_PASSWORD}, "worker", "FRESHREC_REDIS_PASSWORD"),
        ({"redis_password": WRONG_PASSWORD}, "serve", "FRESHREC_REDIS_PASSWORD"),
        ({"kafka_ssl_cafile": "/etc/ssl/certs/ca-certificates.crt"}, "worker",
         "FRESHREC_KAFKA_SSL_CAFILE"),
        ({"redis_ssl_ca_certs": "/etc/ssl/certs/ca-certificates.crt"}, "serve",
         "FRESHREC_REDIS_SSL_CA_CERTS"),
    ],
)  # fmt: skip
def test_refused_credentials_stop_a_command_at_once_with_what_to_fix(
    secured: Secured, tmp_path: Path, change: dict[str, str], command: str, named: str
) -> None:
    wrong = dataclasses.replace(secured.settings, serve_port=free_port(), **change)
    log_path = tmp_path / f"{command}.log"
    started = time.monotonic()
    proc = freshrec_process([command], wrong, log_path)
    try:
        wait_until(lambda: proc.poll() is not None, 30, f"`freshrec {command}` to give up")
    finally:
        stop_process(proc)
    output = log_path.read_text(errors="replace")
    assert proc.returncode == 2, output[-3000:]
    assert time.monotonic() - started < 30
    assert "freshrec: error:" in output and named in output, output[-3000:]
    _assert_no_secret(output, f"`freshrec {command}` output")


def test_a_wrong_password_is_refused_in_process_too(secured: Secured) -> None:
    wrong = dataclasses.replace(secured.settings, kafka_sasl_password=WRONG_PASSWORD)
    with pytest.raises(CredentialsRejected) as refused:
        check_kafka(wrong, timeout_s=20)
    _assert_no_secret(str(refused.value), "the error")


def test_config_shows_no_secret(secured: Secured) -> None:
    env = {**os.environ, **secured.settings.environ()}
    outputs = {}
    for args in (["config"], ["config", "--json"]):
        done = subprocess.run(
            [sys.executable, "-m", "freshrec.cli", *args],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        _assert_no_secret(done.stdout + done.stderr, f"freshrec {' '.join(args)}")
        assert secured.settings.redis_url in done.stdout
        outputs[args[-1]] = done.stdout
    shown = json.loads(outputs["--json"])
    assert shown["kafka_sasl_password"] == "***" and shown["redis_password"] == "***"
    assert "FRESHREC_KAFKA_SASL_USERNAME=freshrec" in outputs["config"]


def test_the_request_path_connection_keeps_the_ca_and_client_certificate(secured: Secured) -> None:
    """The reader's multiplexed connection is made like its pooled client: without the CA
    file and the client certificate this TLS Redis (which requires one) would refuse it."""
    import asyncio

    from freshrec.connections import redis_client
    from freshrec.serving.multiplexed_redis import MultiplexedRedis

    async def ping() -> object:
        pooled = redis_client(secured.settings)
        shared = MultiplexedRedis.like(pooled)
        try:
            return await shared.execute("ACL", "WHOAMI")
        finally:
            await shared.aclose()
            await pooled.aclose()

    assert asyncio.run(ping()) == b"freshrec"
