"""All configuration in one typed place: every default and the environment variable that sets it.

`Settings.from_env()` is the only reader of ``FRESHREC_*`` variables, so the README's
configuration reference (``freshrec config --markdown``) is rendered from this file and cannot
drift from what the code does.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from freshrec.models.config import ModelConfig
from freshrec.models.decay import rate_from_half_life
from freshrec.serving.funnel_config import FunnelConfig

# Each default is written once, in the learners' and the funnel's own configuration; the fields
# below only say which variable sets it.
_MODEL = ModelConfig()
_FUNNEL = FunnelConfig()


def _env(name: str, doc: str, default: Any, secret: bool = False) -> Any:
    return field(default=default, metadata={"env": name, "doc": doc, "secret": secret})


KAFKA_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
KAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
REDIS_CERT_REQS = ("required", "optional", "none")


@dataclass(frozen=True)
class Settings:
    """Runtime configuration of workers, reader and tools, read from ``FRESHREC_*``."""

    # --- services --------------------------------------------------------------------------
    kafka_bootstrap: str = _env(
        "FRESHREC_KAFKA_BOOTSTRAP", "Kafka bootstrap servers; unset: Docker, else local broker.", ""
    )
    redis_url: str = _env(
        "FRESHREC_REDIS_URL", "Redis URL; unset: Docker, else a local redis-server.", ""
    )
    home: str = _env(
        "FRESHREC_HOME",
        "Cache and state folder: Kafka jars, service data and pid files, datasets, compiled "
        "kernels (unless NUMBA_CACHE_DIR is set), Faust's data.",
        str(Path.home() / ".cache" / "freshrec"),
    )
    kafka_version: str = _env(
        "FRESHREC_KAFKA_VERSION", "Apache Kafka version run locally.", "4.1.2"
    )
    redis_cluster: bool = _env(
        "FRESHREC_REDIS_CLUSTER",
        "FRESHREC_REDIS_URL names a node of a Redis Cluster: cluster-aware clients, scripts of "
        "one hash slot, batches at least once. With no URL, a local cluster of three "
        "redis-server processes is started.",
        False,
    )
    redis_persist: bool = _env(
        "FRESHREC_REDIS_PERSIST",
        "A redis-server freshrec starts keeps an append-only file (fsync every second) in its "
        "folder, so a restart keeps the state; 0: memory only.",
        True,
    )
    # --- Kafka security (every Kafka client: worker, producers, admin, reader, consumer) -----
    kafka_security_protocol: str = _env(
        "FRESHREC_KAFKA_SECURITY_PROTOCOL",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
        "PLAINTEXT",
    )
    kafka_sasl_mechanism: str = _env(
        "FRESHREC_KAFKA_SASL_MECHANISM",
        "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with a SASL_* protocol).",
        "SCRAM-SHA-512",
    )
    kafka_sasl_username: str = _env(
        "FRESHREC_KAFKA_SASL_USERNAME", "SASL user (with a SASL_* protocol).", ""
    )
    kafka_sasl_password: str = _env(
        "FRESHREC_KAFKA_SASL_PASSWORD", "SASL password; never printed.", "", secret=True
    )
    kafka_ssl_cafile: str = _env(
        "FRESHREC_KAFKA_SSL_CAFILE",
        "PEM CA bundle the broker's certificate is checked against; unset: the system's.",
        "",
    )
    kafka_ssl_certfile: str = _env(
        "FRESHREC_KAFKA_SSL_CERTFILE", "PEM client certificate (mutual TLS).", ""
    )
    kafka_ssl_keyfile: str = _env(
        "FRESHREC_KAFKA_SSL_KEYFILE", "PEM private key of the client certificate.", ""
    )
    kafka_ssl_key_password: str = _env(
        "FRESHREC_KAFKA_SSL_KEY_PASSWORD",
        "Password of an encrypted client key; never printed.",
        "",
        secret=True,
    )
    kafka_ssl_check_hostname: bool = _env(
        "FRESHREC_KAFKA_SSL_CHECK_HOSTNAME",
        "The broker's certificate must name the host connected to.",
        True,
    )
    # --- Redis security (every Redis client: worker, reader incl. its request path, tools) ---
    redis_username: str = _env(
        "FRESHREC_REDIS_USERNAME", "ACL user, when FRESHREC_REDIS_URL names none.", ""
    )
    redis_password: str = _env(
        "FRESHREC_REDIS_PASSWORD",
        "Password, when FRESHREC_REDIS_URL carries none; never printed.",
        "",
        secret=True,
    )
    redis_ssl_ca_certs: str = _env(
        "FRESHREC_REDIS_SSL_CA_CERTS",
        "PEM CA bundle the server's certificate is checked against (rediss:// URLs); unset: "
        "the system's.",
        "",
    )
    redis_ssl_certfile: str = _env(
        "FRESHREC_REDIS_SSL_CERTFILE", "PEM client certificate (rediss://, mutual TLS).", ""
    )
    redis_ssl_keyfile: str = _env(
        "FRESHREC_REDIS_SSL_KEYFILE", "PEM private key of the client certificate.", ""
    )
    redis_ssl_cert_reqs: str = _env(
        "FRESHREC_REDIS_SSL_CERT_REQS",
        "Verification of the server's certificate: required, optional or none.",
        "required",
    )
    redis_ssl_check_hostname: bool = _env(
        "FRESHREC_REDIS_SSL_CHECK_HOSTNAME",
        "The server's certificate must name the host connected to.",
        True,
    )
    # --- topics and keys -------------------------------------------------------------------
    topic_prefix: str = _env("FRESHREC_TOPIC_PREFIX", "Prefix of every topic name.", "freshrec")
    partitions: int = _env("FRESHREC_PARTITIONS", "Partitions of the events topic.", 4)
    replication_factor: int = _env(
        "FRESHREC_REPLICATION_FACTOR",
        "Copies of each partition of the topics freshrec creates (3 on a production cluster; "
        "above 1, a write needs all but one of them).",
        1,
    )
    key_prefix: str = _env("FRESHREC_KEY_PREFIX", "Prefix of every Redis key.", "fr")
    # --- events ----------------------------------------------------------------------------
    rating_min: float = _env("FRESHREC_RATING_MIN", "Lowest valid rating.", 1.0)
    rating_max: float = _env("FRESHREC_RATING_MAX", "Highest valid rating.", 5.0)
    max_message_bytes: int = _env(
        "FRESHREC_MAX_MESSAGE_BYTES", "Largest accepted message payload.", 1_000_000
    )
    max_id_length: int = _env("FRESHREC_MAX_ID_LENGTH", "Longest accepted user or item id.", 128)
    min_event_ts: float = _env(
        "FRESHREC_MIN_EVENT_TS", "Earliest accepted event time (unix s; 1990-01-01).", 631152000.0
    )
    max_future_s: float = _env(
        "FRESHREC_MAX_FUTURE_S", "How far in the future an event time may lie.", 86400.0
    )
    # --- online matrix factorisation --------------------------------------------------------
    mf_factors: int = _env(
        "FRESHREC_MF_FACTORS", "Latent factors per user and item.", _MODEL.factors
    )
    mf_lr: float = _env("FRESHREC_MF_LR", "SGD step on the rating factors.", _MODEL.lr)
    mf_reg: float = _env("FRESHREC_MF_REG", "L2 penalty on the factors.", _MODEL.reg)
    mf_bias_lr: float = _env(
        "FRESHREC_MF_BIAS_LR",
        "Floor eta_b of the bias step 1/(n + beta) + eta_b (n: the user's or item's ratings).",
        _MODEL.bias_lr,
    )
    mf_bias_shrinkage: float = _env(
        "FRESHREC_MF_BIAS_SHRINKAGE",
        "beta of the bias step, in ratings: how far a new user's or item's bias is shrunk.",
        _MODEL.bias_shrinkage,
    )
    mf_init_std: float = _env(
        "FRESHREC_MF_INIT_STD", "Std of initial latent factors.", _MODEL.init_std
    )
    mf_seed: int = _env("FRESHREC_MF_SEED", "Seed of the per-id initial factors.", _MODEL.seed)
    implicit_lr: float = _env(
        "FRESHREC_IMPLICIT_LR",
        "Largest SGD step on implicit feedback; each step is also capped so it cannot overshoot.",
        _MODEL.implicit_lr,
    )
    implicit_alpha: float = _env(
        "FRESHREC_IMPLICIT_ALPHA",
        "Confidence slope alpha in c = 1 + alpha*f.",
        _MODEL.implicit_alpha,
    )
    implicit_negatives: int = _env(
        "FRESHREC_IMPLICIT_NEGATIVES",
        "Sampled unobserved items per implicit event.",
        _MODEL.implicit_negatives,
    )
    weight_view: float = _env(
        "FRESHREC_WEIGHT_VIEW", "Strength f of a view.", _MODEL.strengths["view"]
    )
    weight_click: float = _env(
        "FRESHREC_WEIGHT_CLICK", "Strength f of a click.", _MODEL.strengths["click"]
    )
    weight_purchase: float = _env(
        "FRESHREC_WEIGHT_PURCHASE", "Strength f of a purchase.", _MODEL.strengths["purchase"]
    )
    weight_rating: float = _env(
        "FRESHREC_WEIGHT_RATING",
        "Strength of a rating in co-occurrence and popularity.",
        _MODEL.strengths["rating"],
    )
    # --- co-occurrence, popularity, history -------------------------------------------------
    decay_half_life_s: float = _env(
        "FRESHREC_DECAY_HALF_LIFE_S",
        "Half-life of co-occurrence and popularity evidence; a state keeps its first's.",
        _MODEL.decay_half_life_s,
    )
    history_window: int = _env(
        "FRESHREC_HISTORY_WINDOW",
        "Most recent items of a user that seed item-CF recall.",
        _MODEL.history_window,
    )
    history_cap: int = _env(
        "FRESHREC_HISTORY_CAP",
        "Items kept per user (seen filter, recall seeds).",
        _MODEL.history_cap,
    )
    cooccurrence_history: int = _env(
        "FRESHREC_COOCCURRENCE_HISTORY",
        "Most recent items of a user a new item co-occurs with (at most FRESHREC_HISTORY_CAP).",
        _MODEL.cooccurrence_history,
    )
    cooccurrence_gap_exponent: float = _env(
        "FRESHREC_COOCCURRENCE_GAP_EXPONENT",
        "gamma: a new item co-occurs with the user's g-th most recent item at weight g^-gamma.",
        _MODEL.cooccurrence_gap_exponent,
    )
    cf_recency: float = _env(
        "FRESHREC_CF_RECENCY",
        "tau: item-CF weighs a seed a items back in the user's history by exp(-a / tau); where "
        "the choice ranker serves, tau is learned from users' choices, starting here.",
        _FUNNEL.cf_recency,
    )
    neighbours_cap: int = _env(
        "FRESHREC_NEIGHBOURS_CAP",
        "Co-occurring items kept per item (by weight).",
        _MODEL.neighbours_cap,
    )
    rating_history: int = _env(
        "FRESHREC_RATING_HISTORY",
        "Ratings kept per user for the rating blend's neighbours and session terms.",
        _MODEL.rating_history,
    )
    rating_pairs_cap: int = _env(
        "FRESHREC_RATING_PAIRS_CAP",
        "Co-rated items whose rating statistics are kept per item (by co-raters).",
        _MODEL.rating_pairs_cap,
    )
    rating_pairs_window: int = _env(
        "FRESHREC_RATING_PAIRS_WINDOW",
        "Most recent ratings of a user a new rating updates its pair statistics with.",
        _MODEL.rating_pairs_window,
    )
    dedup_events: int = _env(
        "FRESHREC_DEDUP_EVENTS",
        "Event ids kept per user (their newest by event time): an event repeating one of them "
        "is dropped as a duplicate. 0 keeps none.",
        _MODEL.dedup_events,
    )
    user_ttl_s: int = _env(
        "FRESHREC_USER_TTL_S",
        "Idle time after which a user's history and factors expire.",
        _MODEL.user_ttl_s,
    )
    item_ttl_s: int = _env(
        "FRESHREC_ITEM_TTL_S",
        "Idle time (no event, impression or neighbour change) after which an item's factors, "
        "neighbours and statistics are retired.",
        _MODEL.item_ttl_s,
    )
    # --- worker ------------------------------------------------------------------------------
    atomic_batches: bool = _env(
        "FRESHREC_ATOMIC_BATCHES",
        "Apply each batch with its offset watermarks in one transaction (exactly once on a "
        "single Redis); 0: single-key writes, at least once, as on Redis Cluster always.",
        True,
    )
    batch_size: int = _env("FRESHREC_BATCH_SIZE", "Most messages per agent batch.", 1000)
    batch_within_s: float = _env("FRESHREC_BATCH_WITHIN_S", "Longest wait to fill a batch.", 0.01)
    worker_metrics_port: int = _env(
        "FRESHREC_WORKER_METRICS_PORT", "Port of the worker's /metrics (0: none).", 9464
    )
    publish_interval_s: float = _env(
        "FRESHREC_PUBLISH_INTERVAL_S", "Debounce of recommendation publishing per user.", 0.5
    )
    publish_k: int = _env("FRESHREC_PUBLISH_K", "Length of published recommendation lists.", 10)
    # --- reader ------------------------------------------------------------------------------
    serve_host: str = _env(
        "FRESHREC_SERVE_HOST",
        "Bind address of the reader's HTTP server and /metrics, and of the worker's /metrics.",
        "127.0.0.1",
    )
    serve_port: int = _env("FRESHREC_SERVE_PORT", "Reader port.", 8080)
    serve_reuse_port: bool = _env(
        "FRESHREC_SERVE_REUSE_PORT",
        "Several readers may bind the same port (SO_REUSEPORT, Linux): the kernel spreads new "
        "connections among them. Give each its own FRESHREC_READER_METRICS_PORT.",
        False,
    )
    reader_metrics_port: int = _env(
        "FRESHREC_READER_METRICS_PORT",
        "Port of this reader's own /metrics beside the one on its serving port (0: none); "
        "readers sharing a port each need one, as a scrape of the shared port reaches any.",
        0,
    )
    recall_per_seed: int = _env(
        "FRESHREC_RECALL_PER_SEED",
        "Neighbours read per recent item in recall.",
        _FUNNEL.recall_per_seed,
    )
    recall_popular: int = _env(
        "FRESHREC_RECALL_POPULAR", "Popular items added to recall.", _FUNNEL.recall_popular
    )
    recall_mf: int = _env(
        "FRESHREC_RECALL_MF", "Items MF recall adds (best y_u . y_i).", _FUNNEL.recall_mf
    )
    recall_mf_read_share: float = _env(
        "FRESHREC_RECALL_MF_READ_SHARE",
        "Share of the catalogue MF recall's search may read per request; 1 is exact.",
        _FUNNEL.mf_read_share,
    )
    recall_cold: int = _env(
        "FRESHREC_RECALL_COLD", "New, little-shown items the cold pool adds.", _FUNNEL.recall_cold
    )
    cold_max_impressions: int = _env(
        "FRESHREC_COLD_MAX_IMPRESSIONS",
        "Impressions after which an item leaves the cold pool.",
        _FUNNEL.cold_max_impressions,
    )
    coarse_keep: int = _env(
        "FRESHREC_COARSE_KEEP",
        "Candidates the coarse stage keeps for the fine stage.",
        _FUNNEL.coarse_keep,
    )
    max_k: int = _env("FRESHREC_MAX_K", "Largest k a request may ask for.", 200)
    diversity: float = _env(
        "FRESHREC_DIVERSITY",
        "MMR lambda: 0 keeps the ranking order, higher diversifies.",
        _FUNNEL.diversity,
    )
    exploration_slots: int = _env(
        "FRESHREC_EXPLORATION_SLOTS",
        "List positions reserved for cold items chosen by UCB.",
        _FUNNEL.exploration_slots,
    )
    ucb_beta: float = _env(
        "FRESHREC_UCB_BETA", "beta in the UCB bonus beta*sqrt(ln N / n_i).", _FUNNEL.ucb_beta
    )
    ranker_min_clicks: int = _env(
        "FRESHREC_RANKER_MIN_CLICKS",
        "Clicks before the learned click model ranks the fine stage; 0: the fixed blend does "
        "(a variant may set min_clicks to A/B-test the learned ranker).",
        _FUNNEL.min_clicks,
    )
    variants: str = _env(
        "FRESHREC_VARIANTS",
        'A/B variants as JSON, e.g. {"control": {"share": 0.5}, "diverse": {"share": 0.5, '
        '"diversity": 0.5}}; empty: one variant, "control".',
        "",
    )
    attribution_window_s: int = _env(
        "FRESHREC_ATTRIBUTION_WINDOW_S", "How long after an impression a click is attributed.", 1800
    )

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every field from its variable; a malformed value is an error naming it."""
        environ = dict(os.environ if environ is None else environ)
        _refuse_unknown_names(environ, [f.metadata["env"] for f in dataclasses.fields(cls)])
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.metadata["env"], raw, type(f.default))
        values.update(overrides)
        return cls(**values)

    def __post_init__(self) -> None:
        problems = []
        if not self.rating_min < self.rating_max:
            problems.append("FRESHREC_RATING_MIN must be below FRESHREC_RATING_MAX")
        for name in (
            "partitions",
            "replication_factor",
            "mf_factors",
            "history_window",
            "history_cap",
            "cooccurrence_history",
            "batch_size",
            "neighbours_cap",
            "rating_history",
            "rating_pairs_cap",
            "rating_pairs_window",
            "user_ttl_s",
            "item_ttl_s",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{self.env_name(name)} must be at least 1")
        if self.history_cap < self.history_window:
            problems.append("FRESHREC_HISTORY_CAP must be at least FRESHREC_HISTORY_WINDOW")
        if self.history_cap < self.cooccurrence_history:
            problems.append("FRESHREC_HISTORY_CAP must be at least FRESHREC_COOCCURRENCE_HISTORY")
        if self.dedup_events < 0:
            problems.append("FRESHREC_DEDUP_EVENTS must be 0 or more")
        if self.decay_half_life_s <= 0:
            problems.append("FRESHREC_DECAY_HALF_LIFE_S must be positive")
        if self.mf_bias_shrinkage <= 0:
            problems.append("FRESHREC_MF_BIAS_SHRINKAGE must be positive")
        if self.cf_recency <= 0:
            problems.append("FRESHREC_CF_RECENCY must be positive")
        if not 0.0 < self.recall_mf_read_share <= 1.0:
            problems.append("FRESHREC_RECALL_MF_READ_SHARE must be above 0 and at most 1")
        if self.cooccurrence_gap_exponent < 0:
            problems.append("FRESHREC_COOCCURRENCE_GAP_EXPONENT must be at least 0")
        problems.extend(self._security_problems())
        if problems:
            raise ValueError("invalid configuration: " + "; ".join(problems))

    def _security_problems(self) -> list[str]:
        """Credentials and TLS options that could not take effect are errors, not ignored."""
        problems = []
        protocol = self.kafka_security_protocol
        if protocol not in KAFKA_SECURITY_PROTOCOLS:
            problems.append(
                f"FRESHREC_KAFKA_SECURITY_PROTOCOL={protocol!r} is not one of "
                + ", ".join(KAFKA_SECURITY_PROTOCOLS)
            )
        if self.kafka_sasl_mechanism not in KAFKA_SASL_MECHANISMS:
            problems.append(
                f"FRESHREC_KAFKA_SASL_MECHANISM={self.kafka_sasl_mechanism!r} is not one of "
                + ", ".join(KAFKA_SASL_MECHANISMS)
            )
        sasl = protocol.startswith("SASL_")
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            problems.append(
                f"FRESHREC_KAFKA_SECURITY_PROTOCOL={protocol} needs FRESHREC_KAFKA_SASL_USERNAME "
                "and FRESHREC_KAFKA_SASL_PASSWORD"
            )
        if not sasl and (self.kafka_sasl_username or self.kafka_sasl_password):
            problems.append(
                "FRESHREC_KAFKA_SASL_USERNAME/PASSWORD are set but "
                f"FRESHREC_KAFKA_SECURITY_PROTOCOL is {protocol}; use SASL_SSL or SASL_PLAINTEXT"
            )
        kafka_tls = ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
        if protocol not in ("SSL", "SASL_SSL") and any(getattr(self, n) for n in kafka_tls):
            problems.append(
                "FRESHREC_KAFKA_SSL_* files are set but FRESHREC_KAFKA_SECURITY_PROTOCOL is "
                f"{protocol}; use SSL or SASL_SSL"
            )
        if protocol != "PLAINTEXT" and not self.kafka_bootstrap:
            problems.append(
                f"FRESHREC_KAFKA_SECURITY_PROTOCOL={protocol} needs FRESHREC_KAFKA_BOOTSTRAP "
                "(the local broker freshrec starts speaks PLAINTEXT)"
            )
        if self.redis_ssl_cert_reqs not in REDIS_CERT_REQS:
            problems.append(
                f"FRESHREC_REDIS_SSL_CERT_REQS={self.redis_ssl_cert_reqs!r} is not one of "
                + ", ".join(REDIS_CERT_REQS)
            )
        redis_tls = ("redis_ssl_ca_certs", "redis_ssl_certfile", "redis_ssl_keyfile")
        if any(getattr(self, n) for n in redis_tls) and not self.redis_url.startswith("rediss://"):
            problems.append(
                "FRESHREC_REDIS_SSL_* files are set but FRESHREC_REDIS_URL is not a rediss:// URL"
            )
        if (self.redis_username or self.redis_password) and not self.redis_url:
            problems.append(
                "FRESHREC_REDIS_USERNAME/PASSWORD need FRESHREC_REDIS_URL (the local "
                "redis-server freshrec starts has no users)"
            )
        if self.redis_password and _url_password(self.redis_url):
            problems.append(
                "FRESHREC_REDIS_URL carries a password and FRESHREC_REDIS_PASSWORD is set too; "
                "give it once"
            )
        return problems

    @classmethod
    def env_name(cls, field_name: str) -> str:
        return {f.name: f.metadata["env"] for f in dataclasses.fields(cls)}[field_name]

    # --- derived names ---------------------------------------------------------------------
    @property
    def events_topic(self) -> str:
        return f"{self.topic_prefix}.events"

    @property
    def impressions_topic(self) -> str:
        return f"{self.topic_prefix}.impressions"

    @property
    def recommendations_topic(self) -> str:
        return f"{self.topic_prefix}.recommendations"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.dlq"

    @property
    def kernel_cache_dir(self) -> Path:
        """Where numba caches the compiled kernels, unless ``NUMBA_CACHE_DIR`` says otherwise."""
        return Path(self.home) / "numba"

    @property
    def decay_rate(self) -> float:
        """lambda in w(t) = exp(-lambda (t_now - t)), from the half-life."""
        return rate_from_half_life(self.decay_half_life_s)

    @property
    def event_strengths(self) -> dict[str, float]:
        return {
            "view": self.weight_view,
            "click": self.weight_click,
            "purchase": self.weight_purchase,
            "rating": self.weight_rating,
        }

    @property
    def exactly_once(self) -> bool:
        """Batches go with their offset watermarks in one script (`atomic_batches`), which only
        a single Redis can run: on Redis Cluster they are at least once."""
        return self.atomic_batches and not self.redis_cluster

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            factors=self.mf_factors,
            lr=self.mf_lr,
            reg=self.mf_reg,
            bias_lr=self.mf_bias_lr,
            bias_shrinkage=self.mf_bias_shrinkage,
            init_std=self.mf_init_std,
            seed=self.mf_seed,
            implicit_lr=self.implicit_lr,
            implicit_alpha=self.implicit_alpha,
            implicit_negatives=self.implicit_negatives,
            strengths=self.event_strengths,
            decay_half_life_s=self.decay_half_life_s,
            history_window=self.history_window,
            history_cap=self.history_cap,
            cooccurrence_history=self.cooccurrence_history,
            cooccurrence_gap_exponent=self.cooccurrence_gap_exponent,
            neighbours_cap=self.neighbours_cap,
            rating_history=self.rating_history,
            rating_pairs_cap=self.rating_pairs_cap,
            rating_pairs_window=self.rating_pairs_window,
            user_ttl_s=self.user_ttl_s,
            item_ttl_s=self.item_ttl_s,
            dedup_events=self.dedup_events,
        )

    def funnel_config(self) -> FunnelConfig:
        return FunnelConfig(
            history_window=self.history_window,
            history_cap=self.history_cap,
            cf_recency=self.cf_recency,
            recall_per_seed=self.recall_per_seed,
            recall_popular=self.recall_popular,
            recall_mf=self.recall_mf,
            mf_read_share=self.recall_mf_read_share,
            recall_cold=self.recall_cold,
            cold_max_impressions=self.cold_max_impressions,
            coarse_keep=self.coarse_keep,
            factors=self.mf_factors,
            diversity=self.diversity,
            exploration_slots=self.exploration_slots,
            ucb_beta=self.ucb_beta,
            min_clicks=self.ranker_min_clicks,
            rating_scale=(self.rating_min, self.rating_max),
        )

    def environ(self) -> dict[str, str]:
        """These settings as environment variables, for child processes."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.metadata["env"]] = str(int(value) if isinstance(value, bool) else value)
        return out

    def shown(self) -> dict[str, Any]:
        """Every field and its value as it may be printed or logged: secrets masked,
        including a password inside the Redis URL."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                value = MASK
            elif f.name == "redis_url":
                value = mask_url(value)
            out[f.name] = value
        return out

    @classmethod
    def markdown_reference(cls) -> str:
        rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            default = "~/.cache/freshrec" if f.name == "home" else f.default
            shown = f"`{default}`" if default != "" else "(unset)"
            rows.append(f"| `{f.metadata['env']}` | {shown} | {f.metadata['doc']} |")
        return "\n".join(rows)


MASK = "***"


def mask_url(url: str) -> str:
    """``url`` with the password of its user part replaced, for printing and logging."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:{MASK}@{hostpart}"


def _url_password(url: str) -> str:
    _, sep, rest = url.partition("://")
    userinfo, at, _ = rest.rpartition("@")
    return userinfo.partition(":")[2] if sep and at else ""


def _refuse_unknown_names(environ: dict[str, str], known: list[str]) -> None:
    """A misspelt variable would silently leave its setting at the default (an unset address
    starts fresh local services that look healthy), so any unknown ``FRESHREC_*`` is an error."""
    unknown = sorted(n for n in environ if n.startswith("FRESHREC_") and n not in known)
    if not unknown:
        return
    described = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        described.append(f"{name} (did you mean {close[0]}?)" if close else name)
    plural = "s" if len(unknown) > 1 else ""
    raise ValueError(
        f"unknown environment variable{plural} {', '.join(described)}; rename or unset it "
        "(`freshrec config --markdown` lists every setting)"
    )


def _parse(env_name: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
        return raw
    except ValueError:
        raise ValueError(
            f"{env_name}={raw!r} is not a valid {kind.__name__}; unset it or give a {kind.__name__}"
        ) from None
