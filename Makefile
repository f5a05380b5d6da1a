# poolrelay: `make run` starts the relay with two local sinks; `make test` runs every test.
CARGO ?= cargo
BIN := target/debug/poolrelay

.PHONY: build run test lint bench fuzz clean image static test-container

build:
	$(CARGO) build -p poolrelay

run: build
	./scripts/run-local.sh

# Unit tests of every crate, then the end-to-end suite against the built binary,
# then the benchmark's chart writer on synthetic data (bench/test_chart.py).
test: build
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi
	python3 -m unittest discover -s bench -p 'test_*.py'

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Side by side with a throwaway Postfix on loopback (bench/run.py; needs
# Debian's postfix for smtp-source). Prints a table, writes target/bench/results.json
# and one chart per emergency scenario, target/bench/emergency-<scenario>.svg.
# BENCH_SCALE=0.01 is the CI smoke size; BENCH_MICRO=0 skips criterion.
bench:
	$(CARGO) build --release -p poolrelay
	BENCH_NO_BUILD=1 python3 bench/run.py

# Fuzzing (fuzz/, a cargo-fuzz project outside the workspace; needs
# `cargo install cargo-fuzz`): each target runs FUZZ_SECONDS from its seed
# corpus in fuzz/corpus/<target>; what it learns goes to fuzz/work/ (not
# committed), a crash to fuzz/artifacts/<target>/ and fails the run.
# On the stable toolchain: cargo-fuzz's default AddressSanitizer build passes
# -Zsanitizer=address, which stable rustc refuses ("the option `Z` is only
# accepted on the nightly compiler"). `--sanitizer none` leaves that flag out;
# everything else it passes (-Cpasses=sancov-module, -Cllvm-args=...,
# --cfg fuzzing) is stable, so RUSTC_BOOTSTRAP is not needed. Safe Rust's
# failures are panics, which libFuzzer catches without a sanitizer.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := inbound_session data_decoder outbound_reply headers config listserv_import
fuzz:
	$(CARGO) fuzz build --sanitizer none
	@failed=""; \
	for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/work/$$t; \
		if $(CARGO) fuzz run --sanitizer none $$t "$(CURDIR)/fuzz/work/$$t" "$(CURDIR)/fuzz/corpus/$$t" \
			-- -max_total_time=$(FUZZ_SECONDS) -timeout=10 > fuzz/work/$$t.log 2>&1; then \
			echo "fuzz $$t: $$(grep -a '^Done ' fuzz/work/$$t.log)"; \
		else \
			grep -av '^#\|NEW_FUNC' fuzz/work/$$t.log | tail -n 40; \
			echo "fuzz $$t: FAILED (input in fuzz/artifacts/$$t/, log in fuzz/work/$$t.log)"; \
			failed="$$failed $$t"; \
		fi; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crashes in:$$failed"; exit 1; fi

# The container image poolrelay:VERSION and poolrelay:latest (VERSION from
# Cargo.toml), from deploy/container/Containerfile: a static binary on scratch.
# Docker, or Podman where no Docker engine runs (CONTAINER=podman to choose).
VERSION := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n 1)
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
STATIC_BIN := $(TARGET_DIR)/x86_64-unknown-linux-gnu/release/poolrelay
IMAGE_CONTEXT := $(TARGET_DIR)/image-context
CONTAINER ?= $(shell if docker info >/dev/null 2>&1; then echo docker; elif command -v podman >/dev/null 2>&1; then echo podman; else echo docker; fi)

static:
	RUSTFLAGS='-C target-feature=+crt-static' $(CARGO) build --release --target x86_64-unknown-linux-gnu -p poolrelay

image: static
	deploy/container/build-context.sh $(STATIC_BIN) $(IMAGE_CONTEXT)
	$(CONTAINER) build -f deploy/container/Containerfile \
		--build-arg VERSION=$(VERSION) \
		--build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
		--build-arg CREATED=$$(date -u +%Y-%m-%dT%H:%M:%SZ) \
		--build-arg SOURCE=$$(git remote get-url origin 2>/dev/null || true) \
		-t poolrelay:$(VERSION) -t poolrelay:latest $(IMAGE_CONTEXT)
	@$(CONTAINER) image inspect poolrelay:$(VERSION) --format 'poolrelay:$(VERSION) {{.Size}} bytes'

# The image against real peers: SMTP, metrics, uid, persistence across
# containers, the compose stack, the Kubernetes manifests, Prometheus.
test-container: image
	python3 deploy/container/test.py

clean:
	$(CARGO) clean
	rm -rf var
