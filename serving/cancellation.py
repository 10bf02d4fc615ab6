"""Pauses in background loops that end when their task is cancelled, even if a library lost
the cancellation.

On Python before 3.12, ``asyncio.wait_for`` returns its inner result when that completes in the
same loop iteration as a cancel of the waiting task, and the cancel is lost (CPython gh-86296);
redis-py awaits its socket writes that way, so one in a few cancels of a task in a Redis call
vanished and a loop that pauses between calls ran for ever, holding its process at shutdown.
The task still counts the request (``Task.cancelling()``), so a loop that checks it before
each pause ends as asked.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Raises `asyncio.CancelledError` if someone asked to cancel the running task."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def pause(seconds: float) -> None:
    """`asyncio.sleep`, unless the running task was asked to stop: then `CancelledError`."""
    raise_if_cancelled()
    await asyncio.sleep(seconds)
