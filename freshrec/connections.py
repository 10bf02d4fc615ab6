"""How every freshrec process connects to Kafka and Redis: client options from `Settings`.

librdkafka (the confluent-kafka producers, consumers and admin client), aiokafka (under the
Faust worker) and redis-py each spell TLS and SASL their own way. Building all of them here, from
the one set of ``FRESHREC_*`` security settings, means no client can be made without the CA
file, the client certificate or the credentials, and the secrets pass from `Settings` to the
libraries without ever being formatted into a message.

A wrong password or an untrusted certificate should stop a process at start with a message that
says which setting to fix, not leave it retrying in silence: `check_kafka` and `check_redis`
make one round trip each and turn such failures into a `CredentialsRejected` error.
"""

from __future__ import annotations

import ssl
import threading
import time
from typing import Any

from freshrec.settings import Settings, mask_url


class CredentialsRejected(RuntimeError):
    """A server refused the configured credentials or certificates; the message names the
    settings to fix and never holds a secret."""


# --- Kafka -------------------------------------------------------------------------------------
def kafka_config(settings: Settings, bootstrap: str | None = None, **extra: Any) -> dict[str, Any]:
    """librdkafka configuration (producers, consumers, admin clients) with the security settings.

    ``bootstrap`` overrides ``settings.kafka_bootstrap`` (a local broker's address); ``extra``
    are the client's own options (``linger.ms``, ``group.id`` ...).
    """
    config: dict[str, Any] = {"bootstrap.servers": bootstrap or settings.kafka_bootstrap}
    protocol = settings.kafka_security_protocol
    if protocol != "PLAINTEXT":
        config["security.protocol"] = protocol.lower()
    if protocol.startswith("SASL_"):
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        config["sasl.username"] = settings.kafka_sasl_username
        config["sasl.password"] = settings.kafka_sasl_password
    if protocol in ("SSL", "SASL_SSL"):
        _require_files(settings, ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"))
        if settings.kafka_ssl_cafile:
            config["ssl.ca.location"] = settings.kafka_ssl_cafile
        if settings.kafka_ssl_certfile:
            config["ssl.certificate.location"] = settings.kafka_ssl_certfile
        if settings.kafka_ssl_keyfile:
            config["ssl.key.location"] = settings.kafka_ssl_keyfile
        if settings.kafka_ssl_key_password:
            config["ssl.key.password"] = settings.kafka_ssl_key_password
        config["ssl.endpoint.identification.algorithm"] = (
            "https" if settings.kafka_ssl_check_hostname else "none"
        )
    return config | extra


def kafka_ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of the Faust worker's (aiokafka's) connections."""
    _require_files(settings, ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"))
    context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
    context.check_hostname = settings.kafka_ssl_check_hostname
    if settings.kafka_ssl_certfile:
        context.load_cert_chain(
            settings.kafka_ssl_certfile,
            settings.kafka_ssl_keyfile or None,
            settings.kafka_ssl_key_password or None,
        )
    return context


def faust_credentials(settings: Settings) -> Any:
    """Faust's ``broker_credentials`` for the security settings; None for PLAINTEXT."""
    import faust

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = kafka_ssl_context(settings) if protocol in ("SSL", "SASL_SSL") else None
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password,
        ssl_context=context,
        mechanism=settings.kafka_sasl_mechanism,
    )


def check_kafka(settings: Settings, bootstrap: str | None = None, timeout_s: float = 30.0) -> None:
    """Return once the broker answers a metadata request with these credentials.

    Raises `CredentialsRejected` as soon as the broker refuses the SASL credentials or the TLS
    handshake fails (librdkafka would otherwise retry them until the timeout), and
    `TimeoutError` when the broker does not answer at all.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    address = bootstrap or settings.kafka_bootstrap
    refused: list[tuple[bool, str]] = []  # (a TLS failure, librdkafka's message)
    seen = threading.Event()

    def on_error(error: KafkaError) -> None:
        if error.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL):
            refused.append((error.code() == KafkaError._SSL, error.str()))
            seen.set()

    admin = AdminClient(kafka_config(settings, address, error_cb=on_error, log_level=0))
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while not seen.is_set() and (remaining := deadline - time.monotonic()) > 0:
        try:
            if admin.list_topics(timeout=min(remaining, 1.0)).brokers:
                return
        except KafkaException as exc:
            last = str(exc)
        admin.poll(0)  # serves error_cb
    if refused:
        raise CredentialsRejected(_kafka_refusal(settings, address, *refused[0]))
    raise TimeoutError(f"Kafka at {address} gave no metadata within {timeout_s:.0f} s ({last})")


def _kafka_refusal(settings: Settings, address: str, tls: bool, error: str) -> str:
    protocol = settings.kafka_security_protocol
    if not tls and protocol.startswith("SASL_"):
        fix = (
            f"check FRESHREC_KAFKA_SASL_USERNAME ({settings.kafka_sasl_username!r}), "
            f"FRESHREC_KAFKA_SASL_PASSWORD and FRESHREC_KAFKA_SASL_MECHANISM "
            f"({settings.kafka_sasl_mechanism})"
        )
    else:
        fix = (
            "check FRESHREC_KAFKA_SECURITY_PROTOCOL, FRESHREC_KAFKA_SSL_CAFILE, "
            "FRESHREC_KAFKA_SSL_CERTFILE and FRESHREC_KAFKA_SSL_KEYFILE"
        )
    return f"Kafka at {address} refused the connection ({protocol}): {error}; {fix}"


# --- Redis -------------------------------------------------------------------------------------
def redis_options(settings: Settings, url: str | None = None) -> dict[str, Any]:
    """redis-py keyword options beside the URL: ACL user and password, and the TLS options of
    a ``rediss://`` URL. Options the URL itself carries win over these."""
    url = url or settings.redis_url
    options: dict[str, Any] = {}
    if settings.redis_username:
        options["username"] = settings.redis_username
    if settings.redis_password:
        options["password"] = settings.redis_password
    if url.startswith("rediss://"):
        _require_files(settings, ("redis_ssl_ca_certs", "redis_ssl_certfile", "redis_ssl_keyfile"))
        verify = settings.redis_ssl_cert_reqs
        options |= {
            "ssl_cert_reqs": verify,
            "ssl_check_hostname": settings.redis_ssl_check_hostname and verify != "none",
            "ssl_ca_certs": settings.redis_ssl_ca_certs or None,
            "ssl_certfile": settings.redis_ssl_certfile or None,
            "ssl_keyfile": settings.redis_ssl_keyfile or None,
        }
    return options


def redis_client(settings: Settings, url: str | None = None, **kwargs: Any) -> Any:
    """An asyncio redis-py client for ``url`` (default: the configured one) with the security
    settings; ``kwargs`` are the caller's own (timeouts ...). On Redis Cluster
    (``settings.redis_cluster``) a cluster client: it learns the slot map from the node named
    and follows MOVED and ASK redirections."""
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    url = url or settings.redis_url
    kind = RedisCluster if settings.redis_cluster else Redis
    return kind.from_url(url, **redis_options(settings, url), **kwargs)


def redis_sync_client(settings: Settings, url: str | None = None, **kwargs: Any) -> Any:
    """As `redis_client`, blocking (tools, tests, the demo)."""
    import redis
    from redis.cluster import RedisCluster

    url = url or settings.redis_url
    kind = RedisCluster if settings.redis_cluster else redis.Redis
    return kind.from_url(url, **redis_options(settings, url), **kwargs)


def check_redis(settings: Settings, url: str | None = None, timeout_s: float = 5.0) -> None:
    """One PING with these credentials: `CredentialsRejected` when the server refuses the user,
    password or TLS handshake. An unreachable server is not an error here (workers wait for
    it); only what waiting cannot fix is."""
    import redis

    url = url or settings.redis_url
    client = redis_sync_client(
        settings, url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
    )
    shown = mask_url(url)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        raise CredentialsRejected(
            f"Redis at {shown} refused the credentials: {exc}; check the user and password in "
            "FRESHREC_REDIS_URL, or FRESHREC_REDIS_USERNAME and FRESHREC_REDIS_PASSWORD"
        ) from None
    except redis.ResponseError as exc:
        if "NOAUTH" not in str(exc) and "AUTH" not in str(exc).split()[0]:
            raise
        raise CredentialsRejected(
            f"Redis at {shown} wants credentials: {exc}; set FRESHREC_REDIS_PASSWORD "
            "(and FRESHREC_REDIS_USERNAME for an ACL user)"
        ) from None
    except redis.ConnectionError as exc:
        if not isinstance(exc.__cause__ or exc.__context__, ssl.SSLError) and "SSL" not in str(exc):
            return
        raise CredentialsRejected(
            f"the TLS handshake with Redis at {shown} failed: {exc}; check "
            "FRESHREC_REDIS_SSL_CA_CERTS, FRESHREC_REDIS_SSL_CERTFILE, FRESHREC_REDIS_SSL_KEYFILE "
            "and FRESHREC_REDIS_SSL_CERT_REQS"
        ) from None
    finally:
        client.close()


def _require_files(settings: Settings, names: tuple[str, ...]) -> None:
    for name in names:
        path = getattr(settings, name)
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise ValueError(
                    f"{Settings.env_name(name)}={path!r} cannot be read: {exc.strerror}"
                ) from None
