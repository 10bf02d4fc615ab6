"""The worker's policy on Redis errors, without servers: which errors are transient (retried
with capped backoff until the step succeeds) and which stop the worker, with what status."""

from __future__ import annotations

import asyncio

import pytest
from redis import exceptions as redis_errors

from freshrec.store.batch_update import StateWentBack
from freshrec.store.redis_errors import TRANSIENT_ERRORS, transient_error
from freshrec.streams.worker import RedisSteps


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (redis_errors.ConnectionError("Connection refused"), "connection"),
        (redis_errors.TimeoutError("Timeout reading from socket"), "timeout"),
        (redis_errors.BusyLoadingError("Redis is loading the dataset in memory"), "loading"),
        (redis_errors.ResponseError("BUSY Redis is busy running a script."), "busy"),
        (
            redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
            "oom",
        ),
        (
            redis_errors.ResponseError(
                "Error running script (call to f_1): @user_script:3: -OOM command not allowed "
                "when used memory > 'maxmemory'."
            ),
            "oom",
        ),
        (redis_errors.NoScriptError("No matching script."), "noscript"),
        (redis_errors.ReadOnlyError("You can't write against a read only replica."), "readonly"),
        (redis_errors.TryAgainError("Multiple keys request during rehashing of slot"), "tryagain"),
        (redis_errors.MasterDownError("Link with MASTER is down"), "clusterdown"),
        (redis_errors.SlotNotCoveredError("Slot 42 is not covered by the cluster."), "clusterdown"),
        (redis_errors.ResponseError("WRONGTYPE Operation against a key"), None),
        (redis_errors.ResponseError("ERR user_script:1: Script attempted to access"), None),
        (redis_errors.AuthenticationError("invalid username-password pair"), None),
        (redis_errors.NoPermissionError("this user has no permissions"), None),
        (ValueError("a bug of ours"), None),
    ],
)
def test_transient_or_fatal(error: Exception, kind: str | None) -> None:
    assert transient_error(error) == kind
    assert kind is None or kind in TRANSIENT_ERRORS


class _Exited(Exception):
    pass


def _steps(exits: list[int], slept: list[float]) -> RedisSteps:
    def exit(status: int):
        exits.append(status)
        raise _Exited

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    return RedisSteps(first_s=0.05, cap_s=1.0, exit=exit, sleep=sleep)


def test_a_transient_error_is_retried_with_capped_backoff_until_the_step_succeeds() -> None:
    exits: list[int] = []
    slept: list[float] = []
    steps = _steps(exits, slept)
    calls = 0

    async def step() -> str:
        nonlocal calls
        calls += 1
        if calls <= 30:
            raise redis_errors.OutOfMemoryError("command not allowed when used memory")
        return "done"

    assert asyncio.run(steps.run("a step", step)) == "done"
    assert calls == 31 and len(slept) == 30 and not exits
    assert all(0 <= s <= 1.0 for s in slept)
    assert steps.blocked == 0


def test_an_error_retrying_cannot_fix_exits_without_returning() -> None:
    exits: list[int] = []
    slept: list[float] = []
    steps = _steps(exits, slept)

    async def step() -> None:
        raise redis_errors.ResponseError("WRONGTYPE Operation against a key")

    with pytest.raises(_Exited):
        asyncio.run(steps.run("a step", step))
    assert exits == [70] and not slept


def test_redis_older_than_what_the_worker_wrote_exits_for_a_resume_after_its_watermarks() -> None:
    exits: list[int] = []
    slept: list[float] = []
    steps = _steps(exits, slept)

    async def step() -> None:
        raise StateWentBack({"events/0": (29, 24)})

    with pytest.raises(_Exited):
        asyncio.run(steps.run("a step", step))
    assert exits == [76] and not slept and steps.blocked == 0


def test_the_steps_tell_how_long_the_oldest_running_one_has_run() -> None:
    """What the stall watch reads: a step running (retried or not) is not a stalled consumer."""
    steps = _steps([], [])
    seen: list[float] = []

    async def outer() -> None:
        await asyncio.sleep(0.05)
        await steps.run("an inner step", inner)

    async def inner() -> None:
        seen.append(steps.running_s())

    assert steps.running_s() == 0.0
    asyncio.run(steps.run("an outer step", outer))
    assert len(seen) == 1 and seen[0] >= 0.04  # the outer step's age, not the inner one's
    assert steps.running_s() == 0.0
