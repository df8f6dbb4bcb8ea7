# cowdisk — build, test and demo.
#
#   make            build the library (libcowdisk.so/.a), the CLI and include/cowdisk.h
#   make test       every check CI runs: fmt, clippy, header, Rust, C, Python, wheel, Go, nbdkit
#   make demo       create an image in build/demo/ and show qemu-img accepting it
#   make deps       install missing tools (Go, pytest, valgrind, qemu-img) on Debian
#   make bench      cowdisk vs qemu-img on the same workloads → BENCHMARKS.md
#   make stress     the concurrency races, STRESS_ROUNDS rounds each (default 100)
#   make fuzz       the cargo-fuzz targets of fuzz/ for FUZZ_SECONDS (default 60)
#   make clean      remove build products
#
# `make test TEST_STAGES="c go"` runs only some stages.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := all

CARGO      ?= cargo
CC         ?= cc
PYTHON     ?= python3
GO         ?= go
VALGRIND   ?= valgrind

RELEASE    := target/release
LIB_SO     := $(RELEASE)/libcowdisk.so
BUILD      := build
BUILD_JSON := $(BUILD)/cargo-build.json
HEADER     := include/cowdisk.h

C_TEST_SRCS := $(sort $(wildcard tests/c/*.c))
C_STD_FLAGS := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -g -O1
C_LINK      := -L$(RELEASE) -Wl,-rpath,$(CURDIR)/$(RELEASE) -lcowdisk -pthread
VALGRIND_FLAGS := -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,possible \
                  --suppressions=tests/c/valgrind.supp

# Run each stage even when an earlier one failed; `make test` fails if any did.
TEST_STAGES ?= fmt clippy header rust c python pywheel go nbdkit

# The nbdkit plugin (plugins/nbdkit/), built when nbdkit's plugin header is installed.
NBDKIT_PLUGIN := $(BUILD)/nbdkit/nbdkit-cowdisk-plugin.so
NBDKIT_CFLAGS  = $(shell pkg-config --cflags nbdkit 2>/dev/null)

.PHONY: bench stress fuzz all build header plugin deps test test-nbdkit test-fmt test-clippy test-header test-rust test-c \
        test-python test-pywheel test-go demo clean help

all: header plugin

help:
	@sed -n '2,11p' Makefile | sed 's/^# \{0,1\}//'

## ---- build ------------------------------------------------------------------

# Cargo's JSON messages tell where the build script wrote the header.
build:
	@mkdir -p $(BUILD)
	$(CARGO) build --release --message-format=json-render-diagnostics > $(BUILD_JSON)

# Copy the header cbindgen generated into include/ (only when it changed).
header: build
	@gen=$$(scripts/built-header.sh $(BUILD_JSON)); \
	if cmp -s "$$gen" $(HEADER); then \
	    echo "$(HEADER) is up to date"; \
	else \
	    cp "$$gen" $(HEADER); echo "updated $(HEADER) from $$gen"; \
	fi

deps:
	@scripts/deps.sh

# nbdkit loads the plugin with dlopen: it finds libcowdisk through its rpath.
plugin: build
	@if [ -f /usr/include/nbdkit-plugin.h ] || pkg-config --exists nbdkit 2>/dev/null; then \
	    mkdir -p $(BUILD)/nbdkit; \
	    $(CC) $(C_STD_FLAGS) -O2 -fPIC -shared $(NBDKIT_CFLAGS) -Iinclude \
	        -o $(NBDKIT_PLUGIN) plugins/nbdkit/cowdisk.c $(C_LINK) && \
	    echo "built $(NBDKIT_PLUGIN)"; \
	else echo "nbdkit-plugin.h not found (apt-get install nbdkit-plugin-dev): plugin not built"; fi

## ---- tests ------------------------------------------------------------------

test: deps
	@declare -a results=(); failed=0; \
	for stage in $(TEST_STAGES); do \
	    printf '\n==> test-%s\n' "$$stage"; \
	    start=$$SECONDS; \
	    if $(MAKE) --no-print-directory test-$$stage; then status=PASS; \
	    else status=FAIL; failed=$$((failed + 1)); fi; \
	    results+=("$$(printf '  %-8s %s  (%ds)' "$$stage" "$$status" $$((SECONDS - start)))"); \
	done; \
	printf '\n==> summary\n'; printf '%s\n' "$${results[@]}"; \
	if [ $$failed -ne 0 ]; then echo "make test: $$failed stage(s) failed"; exit 1; fi; \
	echo "make test: all stages passed"

STRESS_ROUNDS ?= 100

stress:
	COWDISK_STRESS_ROUNDS=$(STRESS_ROUNDS) $(CARGO) test --release --test concurrency -- --nocapture

test-fmt:
	$(CARGO) fmt --all -- --check

test-clippy:
	$(CARGO) clippy --all-targets -- -D warnings

test-header: build
	@gen=$$(scripts/built-header.sh $(BUILD_JSON)); \
	if cmp -s "$$gen" $(HEADER); then \
	    echo "$(HEADER) matches the header generated from src/ffi"; \
	else \
	    echo "error: $(HEADER) differs from the generated header $$gen:"; \
	    diff -u $(HEADER) "$$gen" | head -40 || true; \
	    echo "error: run 'make header' and commit $(HEADER)"; \
	    exit 1; \
	fi

# The fuzz regressions run again in a debug build too: arithmetic overflow panics
# there, as under the fuzzer, instead of wrapping silently.
test-rust:
	$(CARGO) test --release --no-fail-fast
	$(CARGO) test --test fuzz_regressions

# Compile each tests/c/*.c against include/ and libcowdisk.so, run it under valgrind
# (or AddressSanitizer when valgrind is not installed).
test-c: build
	@mkdir -p $(BUILD)/c
	@echo '#include "cowdisk.h"' | $(CC) -std=c99 -pedantic -Wall -Wextra -Werror \
	    -Iinclude -fsyntax-only -x c - && echo "header compiles on its own as C99"
	@if command -v c++ >/dev/null; then \
	    echo '#include "cowdisk.h"' | c++ -Wall -Werror -Iinclude -fsyntax-only -x c++ - \
	    && echo "header compiles as C++"; fi
	@if [ -z "$(C_TEST_SRCS)" ]; then echo "error: no tests in tests/c/"; exit 1; fi
	@if command -v $(VALGRIND) >/dev/null; then runner="$(VALGRIND) $(VALGRIND_FLAGS)"; san=""; \
	else runner=""; san="-fsanitize=address -fno-omit-frame-pointer"; \
	     echo "valgrind not found: building the C tests with AddressSanitizer"; fi; \
	failed=0; \
	for src in $(C_TEST_SRCS); do \
	    bin=$(BUILD)/c/$$(basename $$src .c); \
	    if ! $(CC) $(C_STD_FLAGS) $$san -Iinclude -o $$bin $$src $(C_LINK); then \
	        echo "--- $$src: FAIL (does not compile)"; failed=$$((failed + 1)); continue; fi; \
	    printf -- '--- %s (%s)\n' "$$bin" "$${runner:-asan}"; \
	    if $$runner ./$$bin; then echo "--- $$bin: PASS"; \
	    else echo "--- $$bin: FAIL"; failed=$$((failed + 1)); fi; \
	done; \
	[ $$failed -eq 0 ] || { echo "$$failed C test(s) failed"; exit 1; }

test-python: build
	@test -d bindings/python/tests || { echo "error: bindings/python/tests is missing"; exit 1; }
	COWDISK_LIB=$(CURDIR)/$(LIB_SO) $(PYTHON) -m pytest -q bindings/python/tests

# pip install / pip wheel of bindings/python in a fresh venv (setuptools-rust builds the
# library into the package, reusing target/), used from elsewhere without COWDISK_LIB.
test-pywheel: build
	PYTHON=$(PYTHON) scripts/test-python-wheel.sh

# -count=1: the Go cache does not see changes in libcowdisk.a, so never reuse results.
test-go: build
	@test -f bindings/go/go.mod || { echo "error: bindings/go/go.mod is missing"; exit 1; }
	cd bindings/go && CGO_ENABLED=1 $(GO) test -count=1 ./...

# Go needs a cache directory; give it one when $$HOME is not set (bare CI containers).
ifeq ($(HOME)$(GOCACHE)$(XDG_CACHE_HOME),)
test-go: export GOCACHE := $(CURDIR)/$(BUILD)/go-cache
endif

# The nbdkit plugin served to qemu-img, qemu-io, nbdinfo, nbdcopy and nbdsh.
test-nbdkit: plugin
	@test -f $(NBDKIT_PLUGIN) || { echo "error: $(NBDKIT_PLUGIN) was not built"; exit 1; }
	COWDISK_NBDKIT_PLUGIN=$(CURDIR)/$(NBDKIT_PLUGIN) COWDISK_CLI=$(CURDIR)/$(RELEASE)/cowdisk \
	    $(PYTHON) -m pytest -q tests/nbdkit

## ---- demo -------------------------------------------------------------------

demo: deps build
	@mkdir -p $(BUILD)/demo
	$(CC) $(C_STD_FLAGS) -Iinclude -o $(BUILD)/demo/demo examples/demo.c $(C_LINK)
	@scripts/demo.sh $(BUILD)/demo

## ---- bench ------------------------------------------------------------------

bench: deps build
	scripts/bench.sh

## ---- fuzz -------------------------------------------------------------------

FUZZ_SECONDS ?= 60

fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

## ---- clean ------------------------------------------------------------------

clean:
	$(CARGO) clean
	rm -rf $(BUILD) .pytest_cache bindings/python/.pytest_cache bindings/python/build \
	    bindings/python/*.egg-info
	find bindings -name __pycache__ -type d -prune -exec rm -rf {} +
