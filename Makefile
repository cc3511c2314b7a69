# clipsearch — the two Quick start commands are `make serve` and `make test`.
#
# The virtual environment lives outside the clone (default ~/.cache/clipsearch/venv) so a
# fresh clone, and CI, reuse the multi-GB torch install instead of downloading it again.
# It is (re)installed whenever the dependency list in pyproject.toml changes. The project
# itself runs from the checkout (PYTHONPATH), so several clones can share one venv.

PYTHON ?= python3
VENV ?= $(HOME)/.cache/clipsearch/venv
PY := $(VENV)/bin/python
DEPS_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.deps-$(DEPS_HASH)
RUN := PYTHONPATH=$(CURDIR) $(PY)
PYTEST_ARGS ?=

.PHONY: install serve test test-all lint proto demo-model clean-venv

install: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) scripts/requirements.py > $(VENV)/requirements.txt
	$(PY) -m pip install --quiet -r $(VENV)/requirements.txt
	rm -f $(VENV)/.deps-*
	touch $(STAMP)

## Run the embedded server: Ray, the encoder, the shards and the gateway on 127.0.0.1:50051.
serve: install
	$(RUN) -m clipsearch.cli serve $(ARGS)

## Run the test suite (hermetic, CPU-only; slow scenarios excluded).
test: install
	$(RUN) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

## Lint, format and type checks (ruff, mypy; generated stubs excluded).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(RUN) -m mypy clipsearch gateway index_service encoder_service training

## Everything, slow scenarios included.
test-all: install
	$(RUN) -m pytest -m "not gpu" $(PYTEST_ARGS)

## Regenerate the Python stubs from protos/ with the pinned grpcio-tools.
proto: install
	$(RUN) scripts/gen_protos.py

## Rebuild the bundled demo model from its seed (a few minutes on 2 cores).
demo-model: install
	$(RUN) -m training.demo_model --out clipsearch/demo/model --seed 0

clean-venv:
	rm -rf $(VENV)
