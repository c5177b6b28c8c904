# weft: the two commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all setup build plugins demo test lint fmt crds bench hot-text images clean cluster-up cluster-down fuzz-smoke fuzz

all: build

# Everything a fresh Debian 12 machine with Rust stable needs. Idempotent.
setup:
	@./.ci/setup

build: setup plugins
	$(CARGO) build --workspace --bins

# The example Wasm plugins, built from source into target/plugins/.
PLUGINS := target/plugins
plugins: setup $(PLUGINS)/peer_gate_c.wasm $(PLUGINS)/rate_limit_c.wasm $(PLUGINS)/body_guard_c.wasm $(PLUGINS)/peer_gate_as.wasm

$(PLUGINS)/peer_gate_c.wasm: examples/plugins/c/peer_gate.c
	@mkdir -p $(PLUGINS)
	clang --target=wasm32-wasi --sysroot=/usr -O2 -mexec-model=reactor -o $@ $<

$(PLUGINS)/rate_limit_c.wasm: examples/plugins/c/rate_limit.c
	@mkdir -p $(PLUGINS)
	clang --target=wasm32-wasi --sysroot=/usr -O2 -mexec-model=reactor -o $@ $<

$(PLUGINS)/body_guard_c.wasm: examples/plugins/c/body_guard.c
	@mkdir -p $(PLUGINS)
	clang --target=wasm32-wasi --sysroot=/usr -O2 -mexec-model=reactor -o $@ $<

$(PLUGINS)/peer_gate_as.wasm: examples/plugins/assemblyscript/assembly/index.ts examples/plugins/assemblyscript/package-lock.json examples/plugins/assemblyscript/asconfig.json
	@mkdir -p $(PLUGINS)
	cd examples/plugins/assemblyscript && npm ci --no-audit --no-fund --loglevel=error && npm run -s build
	cp examples/plugins/assemblyscript/build/peer_gate.wasm $@

demo: build
	$(CARGO) run -q -p weft-e2e --bin weft-demo -- $(DEMO_ARGS)

# The whole suite: formatting, lints, unit, integration and end-to-end tests.
# Incremental caches are dead weight for a one-shot run (tens of GB over
# build + clippy + test), so the suite turns them off.
test: export CARGO_INCREMENTAL = 0
test: build lint fuzz-smoke
	$(CARGO) test --workspace --no-fail-fast

# The fuzz targets (fuzz/, libFuzzer through cargo fuzz on the nightly toolchain;
# README.md "Fuzzing"): each runs for FUZZ_SECONDS from the committed seeds
# (fuzz/corpus/<target>) and what earlier runs kept (fuzz/target/corpus/<target>,
# where new inputs go). A crash or a broken property fails; the input is saved
# under fuzz/artifacts/<target>/.
FUZZ_TARGETS := h1_request h1_response chunked h2c_sniff authz csr cni manifest wasm_abi
FUZZ_SECONDS ?= 20
fuzz-smoke: setup
	@rustup toolchain list | grep -q '^nightly' || { echo "fuzz-smoke: the nightly toolchain is required (rustup toolchain install nightly)" >&2; exit 1; }
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check
	cd fuzz && $(CARGO) +nightly fuzz build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/target/corpus/$$t; log=fuzz/target/$$t.log; \
	  if (cd fuzz && $(CARGO) +nightly fuzz run $$t target/corpus/$$t corpus/$$t -- \
	      -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1) >$$log 2>&1; then \
	    echo "fuzz $$t: $$(grep -h '^stat::number_of_executed_units' $$log), no failure"; \
	  else \
	    tail -n 80 $$log; echo "fuzz $$t FAILED (whole log: $$log)" >&2; exit 1; \
	  fi; \
	done

# One target for a longer campaign: make fuzz FUZZ_TARGET=h1_request FUZZ_SECONDS=3600
fuzz: setup
	cd fuzz && $(CARGO) +nightly fuzz run $(FUZZ_TARGET) target/corpus/$(FUZZ_TARGET) corpus/$(FUZZ_TARGET) -- \
	  -max_total_time=$(FUZZ_SECONDS) -timeout=10 -print_final_stats=1

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Regenerate crds/ (and the chart's copy) from the Rust types (tests fail when they drift).
crds:
	$(CARGO) run -q -p weft-control-plane -- crds --out crds
	cp crds/*.yaml charts/weft/crds/

# Container images as OCI archives in target/images/ (no container engine needed;
# push with skopeo, see README.md "Installing on Kubernetes").
images: setup
	$(CARGO) build --release --workspace --bins
	images/build

bench: setup plugins
	$(CARGO) build --release --workspace --bins
	python3 node-dataplane/link/check-hot-text.py
	$(CARGO) run --release -q -p weft-e2e --bin weft-bench-control-plane
	$(CARGO) run --release -q -p weft-e2e --bin weft-bench-capture -- --rounds 6
	$(CARGO) run --release -q -p weft-e2e --bin weft-bench-proxy
	$(CARGO) run --release -q -p weft-e2e --bin weft-bench-l7
	$(CARGO) run --release -q -p weft-e2e --bin weft-bench-l7 -- --pinned --rounds 9 --seconds 2
	$(CARGO) run --release -q -p weft-e2e --bin weft-bench-routes -- --pinned
	$(CARGO) run --release -q -p weft-e2e --bin weft-bench-l7-path -- --instructions

# A real Kubernetes v1.20 cluster on this machine (root; e2e/src/kubecluster.rs)
# with weft installed by Helm, left running in the background: cluster-up prints how
# to use kubectl and weftctl with it. The first run builds Kubernetes from Debian's
# source package (about 11 minutes, cached under ~/.cache/weft/kube). CLUSTER_NODES
# sets the number of nodes; CLUSTER_ARGS=--no-weft starts Kubernetes alone.
CLUSTER_NODES ?= 2
cluster-up: setup
	$(CARGO) build -q --workspace --bins
	$(CARGO) run -q -p weft-e2e --bin weft-kube-cluster -- up --background --nodes $(CLUSTER_NODES) $(CLUSTER_ARGS)

cluster-down:
	$(CARGO) run -q -p weft-e2e --bin weft-kube-cluster -- down

# Regenerates the node agent's hot-code layout from profiles of the agent under load
# and links the agent with it (root, perf; node-dataplane/link/README.md).
hot-text: setup plugins
	$(CARGO) build --release --workspace --bins
	rm -rf target/hot-text-profile
	WEFT_WORKER_THREADS=1 target/release/weft-bench-l7 --rounds 1 --seconds 10 --pinned --profile target/hot-text-profile
	python3 node-dataplane/link/gen-hot-text.py --agent-profile target/hot-text-profile/*.perf.data
	# The same command as above (and as make images and make bench): another one
	# unifies features differently, which renames the generic code the layout names.
	$(CARGO) build --release --workspace --bins
	python3 node-dataplane/link/check-hot-text.py

clean:
	$(CARGO) clean
