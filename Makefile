# streamret: `make run` trains the embedded default job end to end; `make test` runs the tests.
# Both create .venv and install the project on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch/torchvision first and pinned, so nothing below can pull in a different build.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) launch/train.py

# One pytest-xdist worker per core (tests/conftest.py keeps the Ray tests together on one of them).
XDIST := -n auto --dist loadscope

test: install
	$(PY) -m pytest -q $(XDIST)

test-fast: install
	$(PY) -m pytest -q $(XDIST) -m "not slow"

bench: install
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) launch/bench.py ops --quick
	$(PY) launch/bench.py decode
	$(PY) launch/bench.py train

clean:
	rm -rf runs data/synthetic mlflow.db mlartifacts bench
