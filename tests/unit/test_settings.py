"""Configuration is read from FRESHREC_* and malformed values are named in the error."""

from __future__ import annotations

import pytest

from freshrec.settings import Settings


def test_environment_overrides_defaults() -> None:
    s = Settings.from_env({"FRESHREC_PARTITIONS": "8", "FRESHREC_REDIS_PERSIST": "yes"})
    assert s.partitions == 8 and s.redis_persist is True
    assert s.events_topic == "freshrec.events" and s.dlq_topic == "freshrec.dlq"


def test_a_malformed_value_names_its_variable() -> None:
    with pytest.raises(ValueError, match="FRESHREC_MF_FACTORS='many' is not a valid int"):
        Settings.from_env({"FRESHREC_MF_FACTORS": "many"})


def test_inconsistent_values_are_refused() -> None:
    with pytest.raises(ValueError, match="FRESHREC_RATING_MIN must be below"):
        Settings.from_env({"FRESHREC_RATING_MIN": "5", "FRESHREC_RATING_MAX": "1"})


@pytest.mark.parametrize("share", ["0", "1.5", "-0.1"])
def test_a_read_share_outside_zero_to_one_is_refused(share: str) -> None:
    with pytest.raises(ValueError, match="FRESHREC_RECALL_MF_READ_SHARE must be above 0"):
        Settings.from_env({"FRESHREC_RECALL_MF_READ_SHARE": share})


def test_the_read_share_reaches_the_funnel() -> None:
    s = Settings.from_env({"FRESHREC_RECALL_MF_READ_SHARE": "0.1"})
    assert s.funnel_config().mf_read_share == 0.1
    assert Settings().funnel_config().mf_read_share == 1.0


def test_settings_round_trip_through_the_environment() -> None:
    s = Settings(topic_prefix="x", mf_lr=0.5, redis_persist=True)
    assert Settings.from_env(s.environ()) == s


def test_an_unknown_name_is_refused_with_the_closest_known_one() -> None:
    with pytest.raises(ValueError) as refused:
        Settings.from_env({"FRESHREC_REDIS_ULR": "redis://10.0.0.5:6379/0"})
    assert "FRESHREC_REDIS_ULR (did you mean FRESHREC_REDIS_URL?)" in str(refused.value)


def test_every_unknown_name_is_listed() -> None:
    with pytest.raises(ValueError) as refused:
        Settings.from_env({"FRESHREC_KAFKA_BOOTSTRAPS": "h:9092", "FRESHREC_ZZZ": "1"})
    message = str(refused.value)
    assert "FRESHREC_KAFKA_BOOTSTRAPS (did you mean FRESHREC_KAFKA_BOOTSTRAP?)" in message
    assert "FRESHREC_ZZZ" in message


def test_other_variables_are_not_ours_to_judge() -> None:
    assert Settings.from_env({"PATH": "/bin", "FRESHRECX": "1"}) == Settings()


def test_secrets_are_masked_in_what_is_shown() -> None:
    s = Settings.from_env(
        {
            "FRESHREC_REDIS_URL": "rediss://reader:s3cret-url@redis.internal:6380/0",
            "FRESHREC_KAFKA_BOOTSTRAP": "kafka.internal:9093",
            "FRESHREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "FRESHREC_KAFKA_SASL_USERNAME": "worker",
            "FRESHREC_KAFKA_SASL_PASSWORD": "s3cret-sasl",
            "FRESHREC_KAFKA_SSL_KEY_PASSWORD": "s3cret-key",
        }
    )
    shown = repr(s.shown())
    assert "s3cret" not in shown
    assert "rediss://reader:***@redis.internal:6380/0" in shown and "worker" in shown


def test_the_password_option_is_masked_too() -> None:
    s = Settings.from_env(
        {"FRESHREC_REDIS_URL": "rediss://h:6380/0", "FRESHREC_REDIS_PASSWORD": "s3cret"}
    )
    assert s.shown()["redis_password"] == "***" and "s3cret" not in repr(s.shown())


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({"FRESHREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "FRESHREC_KAFKA_BOOTSTRAP": "h:1"},
         "needs FRESHREC_KAFKA_SASL_USERNAME"),
        ({"FRESHREC_KAFKA_SECURITY_PROTOCOL": "TLS"}, "is not one of PLAINTEXT"),
        ({"FRESHREC_KAFKA_SASL_USERNAME": "u", "FRESHREC_KAFKA_SASL_PASSWORD": "p"},
         "use SASL_SSL or SASL_PLAINTEXT"),
        ({"FRESHREC_KAFKA_SSL_CAFILE": "/ca.pem"}, "use SSL or SASL_SSL"),
        ({"FRESHREC_KAFKA_SECURITY_PROTOCOL": "SSL"}, "needs FRESHREC_KAFKA_BOOTSTRAP"),
        ({"FRESHREC_REDIS_URL": "redis://h:1/0", "FRESHREC_REDIS_SSL_CA_CERTS": "/ca.pem"},
         "not a rediss:// URL"),
        ({"FRESHREC_REDIS_PASSWORD": "p"}, "need FRESHREC_REDIS_URL"),
        ({"FRESHREC_REDIS_URL": "redis://:a@h:1/0", "FRESHREC_REDIS_PASSWORD": "b"},
         "give it once"),
        ({"FRESHREC_REDIS_SSL_CERT_REQS": "maybe"}, "is not one of required"),
    ],
)  # fmt: skip
def test_security_options_that_cannot_take_effect_are_refused(
    environ: dict[str, str], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        Settings.from_env(environ)


def test_a_command_refuses_to_start_with_an_unknown_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from freshrec.cli import main

    monkeypatch.setenv("FRESHREC_KAFKA_BOOTSTRAP_SERVERS", "10.0.0.5:9092")
    assert main(["worker"]) == 2
    error = capsys.readouterr().err
    assert "FRESHREC_KAFKA_BOOTSTRAP_SERVERS (did you mean FRESHREC_KAFKA_BOOTSTRAP?)" in error
