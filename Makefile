# `make run` and `make test` on a fresh machine: both build .venv first (once).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(abspath $(VENV))/bin
# Stages run `python ...`: put the venv first on PATH so DVC finds its interpreter.
export PATH := $(BIN):$(PATH)

.PHONY: help install lock run test test-fast lint format bench accurate clean team-server
.DEFAULT_GOAL := help

help:             ## this list of targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 18

# The venv comes from requirements.lock: every dependency, direct and transitive, pinned (the
# `test` extra included); a lock behind pyproject.toml stops here, saying so (.ci/check_lock.py).
# The project goes in on top, editable and without dependencies, built by the locked setuptools;
# `pip check` then proves the set consistent.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "$$(grep -E '^pip==' requirements.lock || echo pip)"
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python .ci/check_lock.py
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

install: $(VENV)/.installed ## create .venv from requirements.lock (again when it or pyproject.toml changes)

# requirements.lock from pyproject.toml (dependencies and the `test` extra) by pip-compile, which
# resolves with pip and so sees this machine's local wheels too. Existing pins are kept where
# pyproject.toml still allows them; LOCK_ARGS=--upgrade moves every pin to the newest allowed
# release, LOCK_ARGS="--upgrade-package NAME" one. No hashes: torch and the nvidia-* wheels come
# from this machine's local index (pip.conf), whose files need not be the same bytes as PyPI's.
LOCK_ARGS ?=
lock:             ## pin every dependency again from pyproject.toml (pip-compile)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/pip-compile || $(BIN)/python -m pip install --quiet \
	    "$$(grep -E '^pip-tools==' requirements.lock 2>/dev/null || echo 'pip-tools>=7.4')"
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --extra test --strip-extras \
	    --allow-unsafe --no-emit-index-url --no-emit-find-links $(LOCK_ARGS) \
	    -o requirements.lock pyproject.toml

run: install      ## download, preprocess, train, evaluate (and gate): dvc repro
	dvc repro

# The suite on TEST_WORKERS pytest-xdist workers (TEST_WORKERS=0: in this process), a test
# module to a worker, longest first (tests/conftest.py: how tests are grouped, and why).
TEST_WORKERS ?= 2
test: install     ## the full test suite, as CI runs it (real DVC, MLflow, PostgreSQL, Chromium; minutes)
	python -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test-fast: install ## the quick tests for the edit loop (no pipeline runs, servers or browsers; < 1 min)
	python -m pytest -m "not slow" -q

lint: install     ## ruff (lint, formatting), mypy (types) and import-linter (layers): what CI runs
	ruff check .
	ruff format --check .
	mypy
	lint-imports

format: install   ## ruff: fix what can be fixed and format the code
	ruff check --fix .
	ruff format .

bench: install    ## training-speed benchmark (prints samples/s and ratios)
	python benchmarks/train_speed.py

# The accuracy profile: the default recipe (params.yaml: warp augmentation, photometric changes,
# outlier exposure, calibration) trained longer, with every image of a batch warped: 90 epochs.
# A DVC experiment (docs/robustness.md); its gates may only tighten main's.
ACCURATE := -S train.epochs=90 -S train.augment.warp_share=1.0 -S train.augment.photometric_prob=0.12
accurate: install ## the best-accuracy profile (90 epochs), as a DVC experiment "accurate"
	dvc exp run -n accurate $(ACCURATE)

# The team's MLflow server (docs/team.md), logins on: the admin's password comes from
# MLFLOW_AUTH_ADMIN_PASSWORD (or SERVER_ARGS="--admin-password-file FILE"), never from here.
# Alone: a throwaway PostgreSQL cluster and artifact folder, deleted on exit. For real, name
# the team's database and storage:
#   make team-server SERVER_ARGS="--backend-store-uri postgresql://mlflow@db-host/mlflow \
#                                 --artifacts-destination /srv/mlflow-artifacts"
team-server: install ## a shared MLflow server on 127.0.0.1:5000 (PostgreSQL, proxied artifacts)
	digits server $(SERVER_ARGS)

# Using the champion (docs/using.md). `mlflow models serve` runs `uvicorn` found on PATH: the PATH
# export above makes these work whether the venv is activated or not.
MODEL_URI  ?= models:/mnist-mlp@champion
SERVE_PORT ?= 5001
APP_PORT   ?= 8000
.PHONY: serve app
serve: install    ## the champion as a REST API on 127.0.0.1:5001 (mlflow models serve)
	mlflow models serve -m "$(MODEL_URI)" --env-manager local -h 127.0.0.1 -p $(SERVE_PORT)

app: install      ## the drawing page on http://127.0.0.1:8000/ (digits app)
	digits app --model "$(MODEL_URI)" --port $(APP_PORT)

clean:            ## generated data, models, reports and the local MLflow store
	rm -rf data/raw data/processed models reports/figures mlflow.db mlflow.db.lock mlartifacts .checkpoints
