"""``python -m tests.stalled_worker LIMIT_S [pause|run]``: the worker whose stall watch gets a
limit of LIMIT_S seconds instead of `freshrec.streams.worker.STALL_S`. With ``pause`` (the
default) its consumer stops handing it the messages of its partitions once it has them, the way
Faust's does when a rebalance's recovery leaves them paused; with ``run`` it consumes as usual.
Everything else is the real worker on the real services."""

from __future__ import annotations

import asyncio
import logging
import sys

from freshrec.settings import Settings
from freshrec.streams import worker

log = logging.getLogger(__name__)


def main() -> None:
    settings = Settings.from_env()
    worker.STALL_S = float(sys.argv[1])
    pause = (sys.argv[2] if len(sys.argv) > 2 else "pause") == "pause"
    app = worker.create_app(settings, settings.kafka_bootstrap, settings.redis_url)

    @app.task
    async def stall() -> None:
        while not app.consumer.assignment() or app.rebalancing:
            await asyncio.sleep(0.05)
        if pause:
            app.consumer.pause_partitions(app.consumer.assignment())
            log.warning("partitions paused for good: %s", sorted(app.consumer.assignment()))
        else:
            log.warning("partitions owned: %s", sorted(app.consumer.assignment()))

    worker.faust_worker(app, "warning").execute_from_commandline()


if __name__ == "__main__":
    main()
