# murmur's commands. `make demo` and `make test` set up everything they need
# (libtorch included, cached after the first run), build and run.

SHELL := /bin/bash
.DEFAULT_GOAL := demo

# Installs libtorch once (cached in ~/.cache/murmur) and prints its directory.
LIBTORCH_SETUP = LIBTORCH="$$(scripts/setup-libtorch.sh)"
CARGO = $(LIBTORCH_SETUP) cargo
MURMUR = target/release/murmur
MURMUR_DATA_DIR ?= $(abspath ../shared/data)
export MURMUR_DATA_DIR

.PHONY: setup build demo test lint bench clean-demo

setup:
	@scripts/setup-libtorch.sh >/dev/null

build: setup
	$(CARGO) build --release --workspace --bins

# The main job on the built-in data: a falling loss and a final accuracy.
demo: build
	rm -rf target/demo
	$(MURMUR) train --model mlp --data synthetic --steps 3000 --eval-every 500 --log-every 250 --out target/demo
	@echo "summary: target/demo/summary.json"

# The whole suite: unit tests and end-to-end tests with real processes.
test: build
	$(CARGO) test --release --workspace

lint: setup
	cargo fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

bench: build
	scripts/bench.sh
