"""Pipelines that send their scripts by hash alone: one round trip, not two.

redis-py's pipeline asks the server ``SCRIPT EXISTS`` for the scripts it holds before every
execution, and loads the missing ones, so a pipeline with a script in it costs two round trips
each time. A script is loaded once per server and stays loaded until the server restarts or its
cache is flushed, so here the pipeline sends ``EVALSHA`` at once. A command the server answers
``NOSCRIPT`` did nothing; its script is loaded and the command sent again on its own, after the
rest of the pipeline, and its reply takes its place. Only for pipelines that are not
transactions: sent again, a script would run outside the transaction.

On Redis Cluster, scripts are sent whole (`freshrec.store.cluster.EvalScript`), and the
cluster client's own pipeline is used.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, ResponseError

from freshrec.store.cluster import is_cluster


class ScriptPipeline(Pipeline):
    """A non-transactional pipeline whose scripts are assumed loaded (module docstring)."""

    async def load_scripts(self) -> None:
        """Nothing asked ahead: `execute` loads a script when the server answers NOSCRIPT."""

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Every command's reply, in order; with ``raise_on_error`` the first error raised."""
        commands = [args for args, _ in self.command_stack]
        scripts = {script.sha: script for script in self.scripts}
        replies = await super().execute(raise_on_error=False)
        missing = [
            n
            for n, reply in enumerate(replies)
            if isinstance(reply, NoScriptError) and commands[n][1] in scripts
        ]
        if missing:
            client = Redis(connection_pool=self.connection_pool)
            for n in missing:
                _, sha, *rest = commands[n]
                await client.script_load(scripts[sha].script)
                try:
                    replies[n] = await client.evalsha(sha, *rest)
                except ResponseError as exc:
                    replies[n] = exc
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        return replies


def script_pipeline(client: Any) -> Any:
    """A non-transactional pipeline on ``client`` for commands and `ServerScripts` calls."""
    if is_cluster(client):
        return client.pipeline(transaction=False)
    return ScriptPipeline(client.connection_pool, client.response_callbacks, False, None)
