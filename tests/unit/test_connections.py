"""Every client's security options come from the one set of settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from freshrec.connections import faust_credentials, kafka_config, redis_options
from freshrec.settings import Settings


def _secured(tmp_path: Path, **more: str) -> Settings:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    return Settings.from_env(
        {
            "FRESHREC_KAFKA_BOOTSTRAP": "kafka.internal:9093",
            "FRESHREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "FRESHREC_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
            "FRESHREC_KAFKA_SASL_USERNAME": "worker",
            "FRESHREC_KAFKA_SASL_PASSWORD": "pw",
            "FRESHREC_KAFKA_SSL_CAFILE": str(ca),
            "FRESHREC_REDIS_URL": "rediss://redis.internal:6380/0",
            "FRESHREC_REDIS_USERNAME": "reader",
            "FRESHREC_REDIS_PASSWORD": "pw2",
            "FRESHREC_REDIS_SSL_CA_CERTS": str(ca),
            **more,
        }
    )


def test_plaintext_adds_nothing_to_a_kafka_client() -> None:
    assert kafka_config(Settings(), "h:9092", **{"linger.ms": 5}) == {
        "bootstrap.servers": "h:9092",
        "linger.ms": 5,
    }
    assert faust_credentials(Settings()) is None


def test_sasl_over_tls_reaches_librdkafka(tmp_path: Path) -> None:
    config = kafka_config(_secured(tmp_path))
    assert config["security.protocol"] == "sasl_ssl"
    assert config["sasl.mechanism"] == "SCRAM-SHA-256"
    assert (config["sasl.username"], config["sasl.password"]) == ("worker", "pw")
    assert config["ssl.ca.location"] == str(tmp_path / "ca.pem")
    assert config["ssl.endpoint.identification.algorithm"] == "https"


def test_an_unreadable_tls_file_names_its_variable(tmp_path: Path) -> None:
    settings = _secured(tmp_path, FRESHREC_KAFKA_SSL_CERTFILE=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match=r"FRESHREC_KAFKA_SSL_CERTFILE=.*cannot be read"):
        kafka_config(settings)


def test_redis_gets_acl_user_password_and_tls_options(tmp_path: Path) -> None:
    options = redis_options(_secured(tmp_path))
    assert (options["username"], options["password"]) == ("reader", "pw2")
    assert options["ssl_ca_certs"] == str(tmp_path / "ca.pem")
    assert options["ssl_cert_reqs"] == "required" and options["ssl_check_hostname"] is True


def test_no_tls_options_for_a_plain_redis_url() -> None:
    settings = Settings.from_env({"FRESHREC_REDIS_URL": "redis://:pw@h:6379/0"})
    assert redis_options(settings) == {}


def test_unverified_tls_does_not_check_host_names(tmp_path: Path) -> None:
    options = redis_options(_secured(tmp_path, FRESHREC_REDIS_SSL_CERT_REQS="none"))
    assert options["ssl_check_hostname"] is False
