#!/usr/bin/env bash
# `make fuzz`: runs every cargo-fuzz target of fuzz/ for FUZZ_SECONDS seconds in all
# (split between the targets), from a seed corpus made by fuzz/make-corpus.sh.
# Crashes land in fuzz/artifacts/<target>/; copy each into fuzz/regressions/ (named for
# what it found) so that `make test` replays it (tests/fuzz_regressions.rs).
# Needs a nightly toolchain (for the sanitizer flags) and cargo-fuzz; installs
# cargo-fuzz when missing. FUZZ_TARGETS (default "image header") picks targets.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
toolchain=${FUZZ_TOOLCHAIN:-nightly}
if ! cargo "+$toolchain" --version >/dev/null 2>&1; then
    echo "fuzz: needs the $toolchain toolchain (rustup toolchain install $toolchain)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi
[ -d corpus/image ] || ./make-corpus.sh corpus
read -r -a targets <<< "${FUZZ_TARGETS:-image header}"
per=$(( seconds / ${#targets[@]} ))
[ "$per" -ge 1 ] || per=1
for t in "${targets[@]}"; do
    echo "==> fuzzing $t for ${per}s"
    mkdir -p "artifacts/$t"
    # Fork mode goes on after a finding, so one run collects them all.
    cargo "+$toolchain" fuzz run "$t" "corpus/$t" -- \
        -max_total_time="$per" -max_len=600000 -timeout=10 -rss_limit_mb=3072 \
        -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
        -print_final_stats=1 > "artifacts/$t.log" 2>&1 || true
    grep -E "^#[0-9]+: cov|stat::|SUMMARY|panicked" "artifacts/$t.log" | tail -6 || true
done
echo "fuzz: crashes found (fuzz/artifacts):"
find artifacts -type f -name 'crash-*' -o -type f -name 'timeout-*' -o -type f -name 'oom-*' | sed 's/^/  /'
