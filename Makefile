SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 2
NEW_SECRET = $$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))')

.PHONY: run serve test test-services services-env setup lint

# The CPU build of torch goes in first so that installing the project never pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Only `make run` writes this, for local development; `make serve` and `make test` never read it.
.env:
	printf 'DEBUG=1\nSECRET_KEY=%s\n' "$(NEW_SECRET)" > $@
	@echo "Wrote .env for local development (DEBUG=1 and a new SECRET_KEY). Delete it before running this checkout in production."

run: setup .env
	$(PY) manage.py migrate --noinput
	$(PY) manage.py fetch_default_model
	$(PY) manage.py seed_demo
	@echo "Rankwise is starting at http://$(HOST):$(PORT)/ (Ctrl-C stops the web server and the worker)"
	@$(PY) manage.py run_huey --flush-locks & worker=$$!; \
	trap 'kill $$worker 2>/dev/null; sleep 2; kill -9 $$worker 2>/dev/null' INT TERM EXIT; \
	$(PY) manage.py runserver $(HOST):$(PORT)

# Production: settings from the environment only (DEBUG off, no .env), then gunicorn and the worker.
serve: export DEBUG = 0
serve: export RANKWISE_ENV_FILE = /dev/null
serve: setup
	@test -n "$$SECRET_KEY" || { echo "make serve: SECRET_KEY is not set; export a long random one, e.g. SECRET_KEY=$(NEW_SECRET)" >&2; exit 2; }
	@test -n "$$ALLOWED_HOSTS" || { echo "make serve: ALLOWED_HOSTS is not set; export the host names this site answers to, e.g. ALLOWED_HOSTS=rankwise.example.com" >&2; exit 2; }
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput
	$(PY) manage.py check --deploy --fail-level ERROR
	@echo "Rankwise is serving on $(HOST):$(PORT) with $(WORKERS) gunicorn workers (Ctrl-C stops them and the worker)"
	@$(PY) manage.py run_huey --flush-locks & worker=$$!; \
	trap 'kill $$worker 2>/dev/null; sleep 2; kill -9 $$worker 2>/dev/null' INT TERM EXIT; \
	$(VENV)/bin/gunicorn config.wsgi --bind $(HOST):$(PORT) --workers $(WORKERS)

# The suite's settings come from here, never from a .env: a throwaway key, and DEBUG for plain static files.
test: export DEBUG = 1
test: export RANKWISE_ENV_FILE = /dev/null
test: setup
	SECRET_KEY=$(NEW_SECRET) $(PY) manage.py fetch_default_model
	SECRET_KEY=$(NEW_SECRET) $(PY) -m pytest

services-env:
	@[[ "$$DATABASE_URL" == postgres://* ]] || { echo "make test-services: DATABASE_URL must point at PostgreSQL (postgres://...); .ci/services prints one" >&2; exit 2; }
	@[[ "$$REDIS_URL" == redis://* ]] || { echo "make test-services: REDIS_URL must point at Redis (redis://...); .ci/services prints one" >&2; exit 2; }

# The same suite on PostgreSQL and Redis (`.ci/services` starts both on loopback and prints the URLs).
# The slow real-model tests run in `make test` only: they exercise the model, not the database or queue.
test-services: export DEBUG = 1
test-services: export RANKWISE_ENV_FILE = /dev/null
test-services: services-env setup
	SECRET_KEY=$(NEW_SECRET) $(PY) -m pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy feedback training
