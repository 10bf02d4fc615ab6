"""Benchmarks: ingest throughput against a no-op agent, and serving latency under load."""
