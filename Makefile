# `make run` and `make test` on a fresh machine: both build .venv first (once).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(abspath $(VENV))/bin
# Stages run `python ...`: put the venv first on PATH so DVC finds its interpreter.
export PATH := $(BIN):$(PATH)

.PHONY: install run test bench accurate clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install      ## download, preprocess, train, evaluate (and gate): dvc repro
	dvc repro

test: install     ## the test suite (real DVC, MLflow and MNIST from $$MNIST_MIRROR / ../shared/mnist)
	python -m pytest

bench: install    ## training-speed benchmark (prints samples/s and ratios)
	python benchmarks/train_speed.py

# The accuracy profile: the same network and sizes, with transforms.v2 augmentation (random
# affine + elastic, one draw per batch) and 100 epochs. Run as a DVC experiment; see README.
ACCURATE := -S train.epochs=100 -S train.batch_size=256 -S train.lr=0.003 -S train.augment.enabled=true -S train.augment.group_size=256 \
            -S train.augment.elastic_alpha=34.0 -S train.augment.elastic_sigma=4.0
accurate: install ## the 99.2% profile as a DVC experiment named "accurate"
	dvc exp run -n accurate $(ACCURATE)

clean:            ## generated data, models, reports and the local MLflow store
	rm -rf data/raw data/processed models reports/figures mlflow.db mlflow.db.lock mlartifacts .checkpoints
