"""Which Redis errors are worth a retry: one answer for the worker and the reader.

redis-py raises most error replies as a class of their own and strips the code from the message
(``OOM command not allowed ...`` becomes ``OutOfMemoryError("command not allowed ...")``), so
they are told apart by class; the text is the fallback for those that reach us only as text.
"""

from __future__ import annotations

from redis import exceptions as redis_errors

TRANSIENT_ERRORS = (
    "connection",
    "timeout",
    "loading",
    "busy",
    "oom",
    "noscript",
    "readonly",
    "tryagain",
    "clusterdown",
)
"""The ``error`` label values of ``freshrec_worker_redis_retries_total``: a fixed set."""

# Error replies that can also reach us as text (an old server wraps a script's error in
# "ERR Error running script ... -OOM ..."; BUSY has no exception class of its own).
_TRANSIENT_TEXT = (
    ("command not allowed when used memory", "oom"),
    ("BUSY Redis is busy", "busy"),
    ("LOADING Redis is loading", "loading"),
    ("NOSCRIPT", "noscript"),
    ("READONLY You can't write", "readonly"),
    ("TRYAGAIN", "tryagain"),
    ("CLUSTERDOWN", "clusterdown"),
    ("MASTERDOWN", "clusterdown"),
)


def transient_error(exc: BaseException) -> str | None:
    """The kind of a transient Redis error (one of `TRANSIENT_ERRORS`), or None when retrying
    cannot help (`freshrec.streams.worker` says which are which and why)."""
    e = redis_errors
    if isinstance(exc, (e.AuthenticationError, e.AuthorizationError)):
        return None  # a ConnectionError, but a wrong password stays wrong
    if isinstance(exc, e.BusyLoadingError):  # LOADING, also a ConnectionError
        return "loading"
    if isinstance(exc, e.TimeoutError):
        return "timeout"
    if isinstance(exc, e.ConnectionError):
        return "connection"
    kinds: tuple[tuple[type[BaseException], str], ...] = (
        (e.OutOfMemoryError, "oom"),
        (e.NoScriptError, "noscript"),
        (e.ReadOnlyError, "readonly"),
        (e.TryAgainError, "tryagain"),
        (e.ClusterDownError, "clusterdown"),  # MASTERDOWN too
        # No node holds the slot in the client's map: a failover the client has not yet
        # learned of (not a RedisError: a RedisClusterException).
        (e.SlotNotCoveredError, "clusterdown"),
    )
    for kind, label in kinds:
        if isinstance(exc, kind):
            return label
    if isinstance(exc, e.ResponseError):
        text = str(exc)
        for needle, label in _TRANSIENT_TEXT:
            if needle in text:
                return label
    return None
