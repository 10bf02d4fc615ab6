"""The exposure meter's gauges, computed on a metrics server's thread while requests record."""

from __future__ import annotations

import sys
import threading

from freshrec.serving.exposure import ExposureMeter


def test_gauges_computed_on_another_thread_while_lists_are_recorded() -> None:
    meter = ExposureMeter(lambda: 1_000_000, window_s=3600)
    failures: list[BaseException] = []
    recording = threading.Event()

    def scrape() -> None:
        recording.wait()
        try:
            for _ in range(10):
                assert 0.0 <= meter.coverage() <= 1.0
                assert 0.0 <= meter.concentration() <= 1.0
        except BaseException as exc:  # "dictionary changed size during iteration"
            failures.append(exc)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the threads take turns often, as a busy reader's would
    try:
        scraper = threading.Thread(target=scrape)
        scraper.start()
        recording.set()
        n = 0
        while scraper.is_alive():  # lists show new items: the window grows meanwhile
            meter.record([f"i{(n + k) % 100_000}" for k in range(50)], [["cf"]] * 50)
            n += 50
        scraper.join()
    finally:
        sys.setswitchinterval(switch)
    assert not failures, failures[0]
