"""A background loop ends when cancelled even if a call inside it lost the cancellation."""

from __future__ import annotations

import asyncio

import pytest

from freshrec.serving.cancellation import pause


async def _call(lost: list[bool]) -> None:
    """The first time it is cancelled, like ``asyncio.wait_for`` before Python 3.12 when its
    inner future completes as the cancel arrives: the cancellation is swallowed and the call
    returns. Later cancels propagate."""
    try:
        await asyncio.sleep(0.01)
    except asyncio.CancelledError:
        if lost:
            raise
        lost.append(True)


async def _loop(sleep: bool) -> None:
    lost: list[bool] = []
    while True:
        await _call(lost)
        if sleep:
            await asyncio.sleep(0.01)
        else:
            await pause(0.01)


@pytest.mark.parametrize(("sleep", "ends"), [(True, False), (False, True)])
def test_a_loop_pausing_with_pause_ends_when_a_call_lost_its_cancel(
    sleep: bool, ends: bool
) -> None:
    """With ``asyncio.sleep`` the loop outlives its cancel (the check that the test can
    fail); with ``pause`` it ends."""

    async def run() -> bool:
        task = asyncio.create_task(_loop(sleep))
        await asyncio.sleep(0)  # the task is in its first call
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=1.0)
        if not done:
            task.cancel()  # the second is not lost
            await asyncio.wait([task], timeout=1.0)
        return bool(done) and task.cancelled()

    assert asyncio.run(run()) is ends
