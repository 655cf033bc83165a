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

.PHONY: setup build demo test compose-test lint bench clean-demo

setup:
	@scripts/setup-libtorch.sh >/dev/null

build: setup
	$(CARGO) build --release --workspace --bins

# The main job on the built-in data: a 4-node gossip cluster on 127.0.0.1,
# one progress line per node, then the final table and cluster.json.
demo: build
	rm -rf target/demo
	$(MURMUR) cluster --nodes 4 --strategy gossip --topology ring --data synthetic --model mlp \
		--partition dirichlet:0.5 --steps 3000 --local-steps 25 --eval-every 500 --out target/demo

# The whole suite: unit tests and end-to-end tests with real processes. The
# API tests also run an independent Python gRPC client from a cached venv; the
# netns chaos scenario needs root and ip, tc and nft (installed once).
test: build
	scripts/setup-netns.sh
	MURMUR_TEST_PYTHON="$$(scripts/setup-test-venv.sh)" $(CARGO) test --release --workspace

# deploy/docker-compose.yml run for real with rootful podman (installed once
# with apt-get; needs root): 4 nodes, the coordinator and Prometheus on MNIST.
compose-test: build
	scripts/compose-test.sh

lint: setup
	cargo fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

bench: build
	scripts/bench.sh
