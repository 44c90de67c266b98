# Parley's two entry points:
#   make run   set up, build and run the server on the embedded CPU models
#   make test  set up, build and run every test (unit + end-to-end); also builds
#              llama.cpp's llama-server once (an external replica the tests use)
# Both are idempotent: a second run does no downloads and rebuilds nothing.

export CARGO_TARGET_DIR ?= $(HOME)/.cache/parley/target
export PARLEY_MODELS_DIR ?= $(HOME)/.cache/parley/models
CARGO ?= cargo
PARLEY := $(CARGO_TARGET_DIR)/release/parley

.PHONY: run test setup build models llama-server check bench clean-models

run: build models
	$(PARLEY) serve $(ARGS)

test: build models llama-server
	@$(CARGO) build --release --quiet -p parley-load
	PARLEY_LLAMA_SERVER=$$(bash scripts/llama-server.sh) $(CARGO) test --workspace --release --quiet --no-fail-fast -- --test-threads 2
	@PY=$$(bash scripts/python-env.sh) && $$PY -m pytest -q tests/python

setup:
	@bash scripts/setup.sh

build: setup
	@$(CARGO) build --release --quiet --bin parley

# llama.cpp's OpenAI-compatible server, built from source once (15-30 minutes on
# 2 cores) and cached under ~/.cache/parley/llama-server; tests/tests/llama_server.rs
# uses it as an external replica. PARLEY_LLAMA_SERVER=/path skips the build.
llama-server: setup
	@bash scripts/llama-server.sh >/dev/null

models: build
	@$(PARLEY) models install

check: setup
	$(CARGO) clippy --workspace --all-targets --release -- -D warnings
