"""A downstream service: keep the newest recommendation list of every user in memory.

Run beside `freshrec worker` and `freshrec serve`:

    python examples/consume_recommendations.py

Each line printed is a user whose list changed, with the new top items.
"""

from __future__ import annotations

from freshrec.connections import kafka_config
from freshrec.devenv import local_services
from freshrec.settings import Settings
from freshrec.streams.recommendations_consumer import RecommendationsConsumer


def main() -> None:
    settings = Settings.from_env()
    endpoints = local_services.up(settings)
    latest: dict[str, list[str]] = {}
    consumer = RecommendationsConsumer(
        endpoints.kafka_bootstrap,
        settings.recommendations_topic,
        group="example-cache",
        config=kafka_config(settings, endpoints.kafka_bootstrap),
    )
    try:
        for update in consumer:
            latest[update.user_id] = update.item_ids
            print(
                f"{update.user_id}: {' '.join(update.item_ids[:5])}  ({len(latest)} users cached)"
            )
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


if __name__ == "__main__":
    main()
