"""The reader's HTTP API fuzzed from its own OpenAPI description, on a real reader and Redis.

Schemathesis turns ``/openapi.json`` into Hypothesis strategies: requests that fit the
description (positive), requests that break it (negative: ids too long or empty, ``k`` out of
range or not a number, wrong types), and valid requests naming users and items the state
knows, so the funnel's full path runs and not only its unknown-id answers. Each also carries up
to three query parameters no route takes, hostile names and values included, which the reader
ignores. Every answer must be:

* never a 5xx (``not_a_server_error``);
* a status the description lists for the route, with a body of its schema and content type;
* a 4xx for a request that breaks the description, and no 400 for one that fits it.

Afterwards an ordinary request is still answered 200, and the reader's resident memory
(VmRSS) has grown by less than ``RSS_GROWTH_BOUND_KB``, 50 MiB, over the fuzzing: it keeps
nothing per request, so hostile requests cannot grow it (measured: +0.3 MiB on 240 MiB). The
reader then still stops cleanly on SIGTERM.

Reproducible: the examples are derandomised (a fixed seed from the test) with no example
database, and bounded (``MAX_EXAMPLES``): some 11 s of fuzzing and 25 s in all with the
reader's start, on two cores shared with other work (twice that when they are busy).
Shrinking is off: a failure prints a curl command that replays it, and a shrink against a
live server that hangs would wait out a timeout per step.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from schemathesis.specs.openapi import unregister_string_format

from freshrec.serving.openapi import PRINTABLE
from freshrec.settings import Settings
from freshrec.store.batch_update import BatchUpdater
from freshrec.store.keys import Keys
from freshrec.streams.events import Event
from tests.support import http_json, running_reader

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 400
RSS_GROWTH_BOUND_KB = 50 * 1024
REQUEST_TIMEOUT_S = 5.0  # a hang fails the example instead of the whole run
USERS = [f"u{n}" for n in range(20)]
ITEMS = [f"i{n}" for n in range(30)]
TS = 1_700_000_000.0

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.negative_data_rejection,
    schemathesis.checks.positive_data_acceptance,
]


def _rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def _seed(settings: Settings) -> None:
    """Clicks and ratings of ``USERS`` on ``ITEMS``: factors, neighbours and histories exist."""

    async def learn() -> None:
        redis = Redis.from_url(settings.redis_url)
        updater = BatchUpdater(redis, Keys(settings.key_prefix), settings.model_config())
        events, ts = [], TS
        for n in range(600):
            user = USERS[n % len(USERS)]
            events.append(Event("click", user, ITEMS[(7 * n) % len(ITEMS)], ts))
            events.append(Event("rating", user, ITEMS[(3 * n) % len(ITEMS)], ts + 1, 1.0 + n % 5))
            ts += 2
        for start in range(0, len(events), 400):
            await updater.apply(events[start : start + 400])
        await redis.aclose()

    asyncio.run(learn())


def _printable_ids() -> st.SearchStrategy[str]:
    """Ids as the description's ``printable`` format means them, any script, 1-128 chars."""
    return st.text(st.characters(codec="utf-8"), min_size=1, max_size=128).filter(str.isprintable)


def _unknown_query() -> st.SearchStrategy[dict[str, str]]:
    """Query parameters no route takes, hostile names and values included; ignored."""
    name = st.text(max_size=16).filter(lambda n: n not in ("k", "debug"))
    return st.dictionaries(name, st.text(max_size=32), max_size=3)


@pytest.fixture
def printable_format() -> Iterator[None]:
    """The ``printable`` format known to schemathesis for this test only (the registry is
    global)."""
    schemathesis.openapi.format(PRINTABLE, _printable_ids())
    yield
    unregister_string_format(PRINTABLE)


def _requests(
    schema: schemathesis.BaseSchema, operations: list[schemathesis.APIOperation]
) -> st.SearchStrategy[schemathesis.Case]:
    """Positive cases of every route, negative ones of each route with parameters to break, and
    valid ones naming known ids."""
    positive, negative = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
    strategies = [operation.as_strategy(positive) for operation in operations]
    strategies += [op.as_strategy(negative) for op in operations if list(op.iter_parameters())]
    known = {
        "/recommendations/{user_id}": [{"user_id": user} for user in USERS[:3]],
        "/similar/{item_id}": [{"item_id": item} for item in ITEMS[:3]],
        "/predict/{user_id}/{item_id}": [{"user_id": USERS[1], "item_id": ITEMS[2]}],
    }
    strategies += [
        schema[path]["GET"].as_strategy(positive, path_parameters=ids)
        for path, choices in known.items()
        for ids in choices
    ]
    # Drawn uniformly: `one_of` over this many branches leaves the later ones nearly unused.
    return st.sampled_from(strategies).flatmap(lambda strategy: strategy)


def test_fuzzed_requests_get_documented_answers_and_the_reader_keeps_serving(
    settings: Settings,
    tmp_path: Path,
    printable_format: None,
    record_property: Callable[[str, object], None],
) -> None:
    _seed(settings)
    with running_reader(settings, tmp_path / "reader.log") as (base, reader):
        _serve_one(base)  # first answers paid for: lazy imports, caches, buffers
        before_kb = _rss_kb(reader.pid)
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")  # the one it serves
        # Unknown query parameters are ignored by design; they are sent below as `extra`,
        # apart from the cases, so that no case counts as invalid for carrying them.
        schema.config.generation.update(allow_extra_parameters=False)
        operations = [result.ok() for result in schema.get_all_operations()]
        session = requests.Session()
        sent: list[str] = []

        @hypothesis_settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(case=_requests(schema, operations), extra=_unknown_query())
        def fuzz(case: schemathesis.Case, extra: dict[str, str]) -> None:
            assert case.meta is not None
            sent.append(f"{case.operation.label} {case.meta.generation.mode.value}")
            if len(sent) % 50 == 0:
                _serve_one(base)  # ordinary requests are served throughout, not only after
            case.call_and_validate(
                session=session, checks=CHECKS, params=extra, timeout=REQUEST_TIMEOUT_S
            )

        fuzz()
        session.close()

        _serve_one(base)
        assert reader.poll() is None, (tmp_path / "reader.log").read_text()[-3000:]
        after_kb = _rss_kb(reader.pid)
        record_property("rss_kb", (before_kb, after_kb))
        assert after_kb - before_kb < RSS_GROWTH_BOUND_KB, (before_kb, after_kb)
    assert reader.returncode == 0, "the reader did not stop cleanly on SIGTERM"
    # Every route was fuzzed both ways, not only those the strategies happened to favour.
    expected = {f"{op.label} positive" for op in operations}
    expected |= {f"{op.label} negative" for op in operations if list(op.iter_parameters())}
    assert set(sent) == expected, Counter(sent)


def _serve_one(base: str) -> None:
    status, body = http_json(f"{base}/recommendations/{USERS[0]}?k=10")
    assert status == 200 and body["items"], (status, body)
