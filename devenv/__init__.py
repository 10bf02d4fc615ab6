"""The local development environment: services, isolated runs, the demo, child processes."""
