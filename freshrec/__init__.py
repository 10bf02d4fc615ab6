"""freshrec: a streaming, real-time recommender on Kafka, Faust and Redis.

The rooms by role (each a folder at the repository root, installed as ``freshrec.<room>``):
``models`` (pure online learners), ``store`` (the Redis contract), ``streams`` (Kafka and
Faust), ``serving`` (the reader), ``evaluation``, ``bench`` and ``devenv`` (tools).
"""
