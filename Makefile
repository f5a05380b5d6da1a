# poolrelay: `make run` starts the relay with two local sinks; `make test` runs every test.
CARGO ?= cargo
BIN := target/debug/poolrelay

.PHONY: build run test lint bench clean

build:
	$(CARGO) build -p poolrelay

run: build
	./scripts/run-local.sh

# Unit tests of every crate, then the end-to-end suite against the built binary.
test: build
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Side by side with a throwaway Postfix on loopback (bench/run.py; needs
# Debian's postfix for smtp-source). Prints a table, writes target/bench/results.json.
# BENCH_SCALE=0.01 is the CI smoke size; BENCH_MICRO=0 skips criterion.
bench:
	$(CARGO) build --release -p poolrelay
	BENCH_NO_BUILD=1 python3 bench/run.py

clean:
	$(CARGO) clean
	rm -rf var
