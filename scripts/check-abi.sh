#!/usr/bin/env bash
# The ABI as built matches the committed one (abi/cowdisk.symbols), so that every change
# of the exported symbols is a deliberate, reviewed edit of that file:
#   - libcowdisk.so exports exactly the listed symbols, each with its listed version;
#   - libcowdisk.a defines no global symbol but the cowdisk_* API;
#   - the functions include/cowdisk.h declares are the exported ones.
# usage: scripts/check-abi.sh LIBDIR [--update]
set -euo pipefail

libdir=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
list=$here/abi/cowdisk.symbols
so=$(readlink -f "$libdir/libcowdisk.so")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# name@@VERSION of every defined dynamic symbol, minus the version nodes themselves.
nm -D --defined-only --with-symbol-versions "$so" | awk '$2 != "A" {print $3}' | sort > "$tmp/so"
if [[ ${2:-} == --update ]]; then
    { echo "# Symbols exported by libcowdisk.so, with their versions (scripts/check-abi.sh)."
      echo "# Edit only together with abi/cowdisk.map: this is the ABI."
      cat "$tmp/so"; } > "$list"
    echo "wrote $list"; exit 0
fi
grep -v '^#' "$list" | sort > "$tmp/want"
status=0
if ! diff -u "$tmp/want" "$tmp/so" > "$tmp/diff"; then
    echo "error: the symbols exported by $so differ from abi/cowdisk.symbols:"
    cat "$tmp/diff"
    echo "error: if the change is deliberate, run 'make abi-update' and commit abi/"
    status=1
else
    echo "libcowdisk.so exports the $(wc -l < "$tmp/so") symbols of abi/cowdisk.symbols"
fi
if grep -v '@@COWDISK_' "$tmp/so" | grep -q .; then
    echo "error: unversioned exports:"; grep -v '@@COWDISK_' "$tmp/so"; status=1
fi

readelf -s --wide "$libdir/libcowdisk.a" \
    | awk '($5 == "GLOBAL" || $5 == "WEAK" || $5 == "UNIQUE") && $7 != "UND" {print $8}' \
    | sort -u > "$tmp/a"
if grep -v '^cowdisk_' "$tmp/a" > "$tmp/a-extra"; then
    echo "error: libcowdisk.a defines global symbols outside the API, e.g.:"
    head -5 "$tmp/a-extra"; status=1
else
    echo "libcowdisk.a: $(wc -l < "$tmp/a") global symbols, all cowdisk_*"
fi
sed 's/@@.*//' "$tmp/so" > "$tmp/names"
if ! cmp -s "$tmp/names" "$tmp/a"; then
    echo "error: libcowdisk.a and libcowdisk.so export different functions:"
    diff "$tmp/a" "$tmp/names" || true; status=1
fi

# Function declarations in the header: an identifier cowdisk_* followed by '('.
grep -oE '\bcowdisk_[a-z0-9_]+\(' "$here/include/cowdisk.h" | tr -d '(' | sort -u > "$tmp/h"
if ! cmp -s "$tmp/h" "$tmp/names"; then
    echo "error: include/cowdisk.h declares other functions than the library exports:"
    diff "$tmp/h" "$tmp/names" || true; status=1
else
    echo "include/cowdisk.h declares exactly the exported functions"
fi
exit $status
