# freshrec: `make demo` shows the system working, `make test` runs the whole suite.
# Both set up what they need: a virtualenv with the Python packages here, and (when no
# FRESHREC_KAFKA_BOOTSTRAP / FRESHREC_REDIS_URL is set and no Docker engine answers) a local
# Kafka broker from the official jars and a local redis-server.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install demo test lint unit integration bench services-up services-down clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/freshrec demo

test: install lint
	$(PY) -m pytest --durations=15

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

unit: install
	$(PY) -m pytest -m "not integration"

integration: install
	$(PY) -m pytest -m integration

bench: install
	$(VENV)/bin/freshrec bench

services-up: install
	$(VENV)/bin/freshrec services up

services-down: install
	$(VENV)/bin/freshrec services down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
