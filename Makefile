# Parley's two entry points:
#   make run   set up, build and run the server on the embedded CPU models
#   make test  set up, build and run every test (unit + end-to-end)
# Both are idempotent: a second run does no downloads and rebuilds nothing.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/parley/target
export PARLEY_MODELS_DIR ?= $(HOME)/.cache/parley/models
CARGO ?= cargo
PARLEY := $(CARGO_TARGET_DIR)/release/parley

.PHONY: run test setup build models check bench clean-models

run: build models
	$(PARLEY) serve $(ARGS)

test: build models
	$(CARGO) test --workspace --release --quiet -- --test-threads 2
	@PY=$$(bash scripts/python-env.sh) && $$PY -m pytest -q tests/python

setup:
	@bash scripts/setup.sh

build: setup
	@$(CARGO) build --release --quiet --bin parley

models: build
	@$(PARLEY) models install

check: setup
	$(CARGO) clippy --workspace --all-targets --release -- -D warnings
