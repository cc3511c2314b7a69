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

.PHONY: install serve test test-all lint proto demo-model clean-venv bench

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
	$(RUN) -m mypy clipsearch gateway index_service encoder_service training load

## Everything, slow scenarios included.
test-all: install
	$(RUN) -m pytest -m "not gpu" $(PYTEST_ARGS)

## Regenerate the Python stubs from protos/ with the pinned grpcio-tools.
proto: install
	$(RUN) scripts/gen_protos.py

## Rebuild the bundled demo model from its seed with `clipsearch finetune` on generated
## scenes (about 5 minutes on 2 cores; byte-identical for the same seed).
demo-model: install
	$(RUN) -m clipsearch.cli finetune --generated --init fresh --steps 1000 --seed 0 \
		--threads 2 --out clipsearch/demo/model --checkpoint-dir build/demo-model-checkpoint

clean-venv:
	rm -rf $(VENV)

# --- Deployment, load and cross-language checks (issue 6) ------------------------------
# Pinned external tools (ghz, kustomize, kubeconform, buf, hadolint, protoc-gen-go[-grpc])
# live in a cache outside the clone; scripts/dev_tools.sh installs each when its pin changes.
TOOLS_BIN := $(or $(CLIPSEARCH_TOOLS),$(HOME)/.cache/clipsearch/tools)/bin
LOAD_ARGS ?=
PROTO_BASE ?= $(shell git tag --list 'v1.*' --sort=-v:refname | head -n 1)

.PHONY: tools load k8s-check proto-lint proto-breaking docker-lint go-stubs

## Install the pinned tools into ~/.cache/clipsearch/tools (Go proxy, npm, PyPI).
tools:
	scripts/dev_tools.sh >/dev/null

## ghz load kit: embedded server, every scenario, SLO gate (load/slo.yaml); reports in load-results/.
load: install tools
	$(RUN) -m load.run --results load-results $(LOAD_ARGS)

## Render every kustomize overlay and validate it offline (kubeconform, vendored schemas).
k8s-check: tools
	scripts/k8s_check.sh

## buf lint of protos/ (buf.yaml).
proto-lint: tools
	$(TOOLS_BIN)/buf lint

## buf breaking against the newest v1.* tag (PROTO_BASE=v1.2.0 to choose another).
proto-breaking: tools
	@if [ -z "$(PROTO_BASE)" ]; then echo "no v1.* tag yet: nothing to compare against"; \
	else $(TOOLS_BIN)/buf breaking --against '.git#tag=$(PROTO_BASE)'; fi

## hadolint of both Dockerfiles (.hadolint.yaml); no Docker engine needed.
docker-lint: tools
	$(TOOLS_BIN)/hadolint Dockerfile Dockerfile.cuda

## Regenerate the Go stubs in clients/go from protos/ (pinned protoc and plugins).
go-stubs: install tools
	PY=$(PY) scripts/gen_go_stubs.sh

## Benchmarks: served vs raw, side by side (each prints its own table; minutes on 2 cores).
bench: install
	for script in bench/*.py; do $(RUN) $$script || exit 1; done
