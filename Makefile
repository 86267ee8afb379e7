SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test setup lint

# The CPU build of torch goes in first so that installing the project never pulls a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

.env:
	printf 'DEBUG=1\nSECRET_KEY=%s\n' "$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(50))')" > $@

setup: $(VENV)/.installed .env

run: setup
	$(PY) manage.py migrate --noinput
	$(PY) manage.py fetch_default_model
	$(PY) manage.py seed_demo
	@echo "Rankwise is starting at http://$(HOST):$(PORT)/ (Ctrl-C stops the web server and the worker)"
	@$(PY) manage.py run_huey --flush-locks & worker=$$!; \
	trap 'kill $$worker 2>/dev/null; sleep 2; kill -9 $$worker 2>/dev/null' INT TERM EXIT; \
	$(PY) manage.py runserver $(HOST):$(PORT)

test: setup
	$(PY) manage.py fetch_default_model
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy feedback training
