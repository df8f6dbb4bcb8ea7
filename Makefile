# cowdisk — build, test and demo.
#
#   make            build the library (build/lib/), the CLI, its man pages and include/cowdisk.h
#   make install    install library, header, cowdisk.pc, CLI, man pages, nbdkit plugin
#                   (PREFIX=/usr/local, DESTDIR, LIBDIR, INCLUDEDIR, BINDIR, MANDIR, ...)
#   make uninstall  remove what `make install` installed
#   make test       every check CI runs: fmt, clippy, header, ABI, Rust, C, Python, wheel, Go, nbdkit, install
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

VERSION    := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
MAJOR      := $(firstword $(subst ., ,$(VERSION)))
RELEASE    := target/release
BUILD      := build
BUILD_JSON := $(BUILD)/cargo-build.json
HEADER     := include/cowdisk.h
# The libraries everything links and `make install` installs (scripts/link-lib.sh):
# SONAME and symbol versions on the .so, only the cowdisk_* API global in the .a.
LIB_DIR    := $(BUILD)/lib
LIB_SO     := $(LIB_DIR)/libcowdisk.so
LIB_A      := $(LIB_DIR)/libcowdisk.a
MAN_DIR    := $(BUILD)/man
# What the static library needs besides libc (rustc --print native-static-libs).
NATIVE_LIBS := -lgcc_s -lutil -lrt -lpthread -lm -ldl

C_TEST_SRCS := $(sort $(wildcard tests/c/*.c))
C_STD_FLAGS := -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -g -O1
C_LINK      := -L$(LIB_DIR) -Wl,-rpath,$(CURDIR)/$(LIB_DIR) -lcowdisk -pthread
VALGRIND_FLAGS := -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,possible \
                  --suppressions=tests/c/valgrind.supp

# Run each stage even when an earlier one failed; `make test` fails if any did.
TEST_STAGES ?= fmt clippy header abi rust c python pywheel go nbdkit install

# The nbdkit plugin (plugins/nbdkit/), built when nbdkit's plugin header is installed.
NBDKIT_PLUGIN := $(BUILD)/nbdkit/nbdkit-cowdisk-plugin.so
NBDKIT_CFLAGS  = $(shell pkg-config --cflags nbdkit 2>/dev/null)

.PHONY: bench stress fuzz all build lib man header plugin deps test test-nbdkit test-fmt test-clippy test-header \
        test-rust test-c test-python test-pywheel test-go test-abi test-install abi-update install uninstall demo clean help

all: header lib man plugin

help:
	@sed -n '2,11p' Makefile | sed 's/^# \{0,1\}//'

## ---- build ------------------------------------------------------------------

# Cargo's JSON messages tell where the build script wrote the header.
build:
	@mkdir -p $(BUILD)
	$(CARGO) build --release --message-format=json-render-diagnostics > $(BUILD_JSON)

lib: build
	@scripts/link-lib.sh $(RELEASE)/libcowdisk.a $(LIB_DIR) $(VERSION)

# cowdisk.1 and one page per subcommand, generated from the CLI's clap definition.
man: build
	@rm -rf $(MAN_DIR) && mkdir -p $(MAN_DIR)
	@$(RELEASE)/cowdisk generate-man-pages $(MAN_DIR)

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
plugin: lib
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
test-c: lib
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

test-python: lib
	@test -d bindings/python/tests || { echo "error: bindings/python/tests is missing"; exit 1; }
	COWDISK_LIB=$(CURDIR)/$(LIB_SO) $(PYTHON) -m pytest -q bindings/python/tests

# pip install / pip wheel of bindings/python in a fresh venv (setuptools-rust builds the
# library into the package, reusing target/), used from elsewhere without COWDISK_LIB.
test-pywheel: build
	PYTHON=$(PYTHON) scripts/test-python-wheel.sh

# The go tool does not hash build/lib/libcowdisk.a: its SHA-256 in CGO_CFLAGS makes
# a rebuilt library a new cache key (TestLinkedLibraryIsCurrent checks it). The
# static library is tested here; the shared one by `make test-install` (pkg-config).
test-go: lib
	@test -f bindings/go/go.mod || { echo "error: bindings/go/go.mod is missing"; exit 1; }
	cd bindings/go && CGO_ENABLED=1 CGO_CFLAGS="-DCOWDISK_LIB_ID=$$(sha256sum ../../$(LIB_A) | cut -c1-64)" \
	    $(GO) vet -tags cowdisk_repo ./... && \
	CGO_ENABLED=1 CGO_CFLAGS="-DCOWDISK_LIB_ID=$$(sha256sum ../../$(LIB_A) | cut -c1-64)" \
	    $(GO) test -tags cowdisk_repo -count=1 ./...

# Go needs a cache directory; give it one when $$HOME is not set (bare CI containers).
ifeq ($(HOME)$(GOCACHE)$(XDG_CACHE_HOME),)
test-go test-install: export GOCACHE := $(CURDIR)/$(BUILD)/go-cache
endif

# The exported symbols of build/lib match abi/cowdisk.symbols (scripts/check-abi.sh).
test-abi: lib
	@scripts/check-abi.sh $(LIB_DIR)

# After a deliberate ABI change (new functions need a new node in abi/cowdisk.map).
abi-update: lib
	@scripts/check-abi.sh $(LIB_DIR) --update

# `make install DESTDIR=<tmp> PREFIX=/usr`, then C (shared and static), Go and Python
# programs outside the repository built only from what was installed.
test-install: all
	@scripts/test-install.sh

# The nbdkit plugin served to qemu-img, qemu-io, nbdinfo, nbdcopy and nbdsh.
test-nbdkit: plugin
	@test -f $(NBDKIT_PLUGIN) || { echo "error: $(NBDKIT_PLUGIN) was not built"; exit 1; }
	COWDISK_NBDKIT_PLUGIN=$(CURDIR)/$(NBDKIT_PLUGIN) COWDISK_CLI=$(CURDIR)/$(RELEASE)/cowdisk \
	    $(PYTHON) -m pytest -q tests/nbdkit

## ---- install ----------------------------------------------------------------

PREFIX       ?= /usr/local
EXEC_PREFIX  ?= $(PREFIX)
BINDIR       ?= $(EXEC_PREFIX)/bin
LIBDIR       ?= $(EXEC_PREFIX)/lib
INCLUDEDIR   ?= $(PREFIX)/include
DATAROOTDIR  ?= $(PREFIX)/share
MANDIR       ?= $(DATAROOTDIR)/man
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
# Where nbdkit looks for plugins (`nbdkit cowdisk file=...`); empty: plugin not installed.
NBDKIT_PLUGINDIR ?= $(shell pkg-config --variable=plugindir nbdkit 2>/dev/null)
INSTALL      ?= install
STRIP        ?= strip

# Installed binaries are stripped; the build tree keeps the debug information. The
# nbdkit plugin is relinked against the installed library (no build-tree rpath).
install: all
	$(INSTALL) -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(PKGCONFIGDIR) \
	    $(DESTDIR)$(BINDIR) $(DESTDIR)$(MANDIR)/man1
	$(INSTALL) -m 755 $(LIB_DIR)/libcowdisk.so.$(VERSION) $(DESTDIR)$(LIBDIR)/
	$(STRIP) --strip-unneeded $(DESTDIR)$(LIBDIR)/libcowdisk.so.$(VERSION)
	ln -sfn libcowdisk.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libcowdisk.so.$(MAJOR)
	ln -sfn libcowdisk.so.$(MAJOR) $(DESTDIR)$(LIBDIR)/libcowdisk.so
	$(INSTALL) -m 644 $(LIB_A) $(DESTDIR)$(LIBDIR)/
	$(STRIP) --strip-debug $(DESTDIR)$(LIBDIR)/libcowdisk.a
	$(INSTALL) -m 644 $(HEADER) $(DESTDIR)$(INCLUDEDIR)/
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' \
	    -e 's|@VERSION@|$(VERSION)|' -e 's|@NATIVE_LIBS@|$(NATIVE_LIBS)|' \
	    packaging/cowdisk.pc.in > $(DESTDIR)$(PKGCONFIGDIR)/cowdisk.pc
	chmod 644 $(DESTDIR)$(PKGCONFIGDIR)/cowdisk.pc
	$(INSTALL) -m 755 -s $(RELEASE)/cowdisk $(DESTDIR)$(BINDIR)/
	$(INSTALL) -m 644 $(MAN_DIR)/*.1 $(DESTDIR)$(MANDIR)/man1/
	@if [ -n "$(NBDKIT_PLUGINDIR)" ] && [ -f $(NBDKIT_PLUGIN) ]; then \
	    $(INSTALL) -d $(DESTDIR)$(NBDKIT_PLUGINDIR); \
	    echo "installing nbdkit-cowdisk-plugin.so into $(DESTDIR)$(NBDKIT_PLUGINDIR)"; \
	    $(CC) $(C_STD_FLAGS) -O2 -fPIC -shared $(NBDKIT_CFLAGS) -Iinclude \
	        -o $(DESTDIR)$(NBDKIT_PLUGINDIR)/nbdkit-cowdisk-plugin.so plugins/nbdkit/cowdisk.c \
	        -L$(LIB_DIR) -lcowdisk $(if $(filter /usr/lib /lib,$(LIBDIR)),,-Wl,-rpath,$(LIBDIR)); \
	    $(STRIP) --strip-unneeded $(DESTDIR)$(NBDKIT_PLUGINDIR)/nbdkit-cowdisk-plugin.so; \
	else echo "nbdkit plugin not installed (no nbdkit plugin directory or plugin not built)"; fi
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ] && command -v ldconfig >/dev/null; then ldconfig; fi

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/libcowdisk.so.$(VERSION) $(DESTDIR)$(LIBDIR)/libcowdisk.so.$(MAJOR) \
	    $(DESTDIR)$(LIBDIR)/libcowdisk.so $(DESTDIR)$(LIBDIR)/libcowdisk.a \
	    $(DESTDIR)$(INCLUDEDIR)/cowdisk.h $(DESTDIR)$(PKGCONFIGDIR)/cowdisk.pc \
	    $(DESTDIR)$(BINDIR)/cowdisk $(DESTDIR)$(MANDIR)/man1/cowdisk.1 $(DESTDIR)$(MANDIR)/man1/cowdisk-*.1
	@if [ -n "$(NBDKIT_PLUGINDIR)" ]; then rm -f $(DESTDIR)$(NBDKIT_PLUGINDIR)/nbdkit-cowdisk-plugin.so; fi
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ] && command -v ldconfig >/dev/null; then ldconfig; fi

## ---- demo -------------------------------------------------------------------

demo: deps lib
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
