"""A Faust app whose Kafka consumer reads only committed transactions.

A producer may write the events topic in transactions (a stream processor with exactly-once
output, a service that writes its database and its events together). Faust's consumer reads
them ``read_uncommitted`` unless Faust itself runs exactly-once, which the worker does not
(its exactly-once is the offset watermarks in Redis): the events of a transaction its producer
aborts would be learned, and those of a transaction retried after an abort learned twice.
``read_committed`` delivers a transaction's events once it commits, and never those of an
aborted one; for a producer that does not use transactions it changes nothing.

Faust chooses the isolation level where it builds aiokafka's consumer, so the app brings its
own transport, whose consumer thread sets the level on that consumer before it starts.
"""

from __future__ import annotations

from typing import Any

import aiokafka
import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

ISOLATION_LEVEL = "read_committed"


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # Read by its fetcher, which `start()` creates: set before the thread starts it.
        consumer._isolation_level = ISOLATION_LEVEL
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class ReadCommittedApp(faust.App):
    """`faust.App` on Kafka (``kafka://`` brokers) reading committed transactions only."""

    def _new_transport(self) -> faust_aiokafka.Transport:
        return _Transport(self.conf.broker_consumer, self)
