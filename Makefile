# poolrelay: `make run` starts the relay with two local sinks; `make test` runs every test.
CARGO ?= cargo
BIN := target/debug/poolrelay

.PHONY: build run test lint bench fuzz clean

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

clean:
	$(CARGO) clean
	rm -rf var
