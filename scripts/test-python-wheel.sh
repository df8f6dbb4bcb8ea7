#!/usr/bin/env bash
# `make test-pywheel`: the Python binding installs like any package.
#
# In a fresh venv, `pip install bindings/python` (setuptools-rust compiles libcowdisk and
# puts it in the package); then, from another directory and without COWDISK_LIB, the
# installed package loads its own library copy, writes and reads an image, and qemu-img
# checks it. Then `pip wheel` must give a platform-tagged wheel with a stripped
# cowdisk/libcowdisk.so.
#
# Cargo builds in the repository's target/ (CARGO_TARGET_DIR, unless already set), so
# the dependencies `make build` compiled are reused. pip fetches setuptools and
# setuptools-rust from PyPI into its isolated build environment.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
# The unstripped release library is ~23 MB; the shipped one must be far smaller.
MAX_SO_BYTES=${MAX_SO_BYTES:-$((8 * 1024 * 1024))}

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
unset COWDISK_LIB PYTHONPATH PIP_NO_BUILD_ISOLATION
export PIP_DISABLE_PIP_VERSION_CHECK=1

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cowdisk-pywheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

fail() { echo "test-pywheel: FAIL: $*" >&2; exit 1; }
step_start=0
step() { step_start=$EPOCHREALTIME; printf -- '--- %s\n' "$*"; }
took() { awk -v a="$step_start" -v b="$EPOCHREALTIME" 'BEGIN { printf "    (%.1fs)\n", b - a }'; }

if ! "$PYTHON" -c 'import ensurepip' >/dev/null 2>&1; then
    fail "$PYTHON has no venv support (Debian: apt-get install python3-venv, or make deps)"
fi

step "$PYTHON -m venv $tmp/venv"
"$PYTHON" -m venv "$tmp/venv"
venv_py=$tmp/venv/bin/python
took

step "pip install bindings/python (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
"$venv_py" -m pip install -q "$repo/bindings/python"
took

step "import the installed package from another directory"
mkdir "$tmp/run"
(cd "$tmp/run" && "$venv_py" - "$tmp/venv" "$tmp/run/disk.qcow2") <<'EOF'
import os
import sys
from pathlib import Path

import cowdisk

venv = Path(sys.argv[1]).resolve()
package = Path(cowdisk.__file__).resolve().parent
assert venv in package.parents, f"cowdisk imported from {package}, not from {venv}"
own = package / "libcowdisk.so"
assert Path(cowdisk.library_path).resolve() == own, f"loaded {cowdisk.library_path}, not {own}"
assert (package / "py.typed").is_file(), "py.typed is not installed"

path = sys.argv[2]
data = os.urandom(3 * 1024 * 1024 + 123)
cowdisk.create(path, 64 * 1024 * 1024)
with cowdisk.open(path) as img:
    img.pwrite(data, 1024 * 1024 - 7)
    img.flush()
with cowdisk.open(path, readonly=True) as img:
    assert img.pread(len(data), 1024 * 1024 - 7) == data
    assert img.size == 64 * 1024 * 1024
try:
    cowdisk.open(os.path.join(os.path.dirname(path), "missing.qcow2"))
except FileNotFoundError as e:
    assert isinstance(e, cowdisk.Error)
else:
    raise AssertionError("opening a missing image did not raise FileNotFoundError")
print(f"    cowdisk {cowdisk.version()} from {package}, library {cowdisk.library_path}")
EOF
qemu-img check "$tmp/run/disk.qcow2" | sed 's/^/    /'
took

step "pip wheel --no-deps bindings/python"
"$venv_py" -m pip wheel -q --no-deps -w "$tmp/wheels" "$repo/bindings/python"
took
wheels=("$tmp"/wheels/*.whl)
[[ ${#wheels[@]} -eq 1 && -f ${wheels[0]} ]] || fail "expected one wheel, got: ${wheels[*]}"
wheel=$(basename "${wheels[0]}")
echo "    $wheel"
[[ $wheel =~ -(linux|manylinux)[a-z0-9_]*\.whl$ ]] || fail "$wheel is not platform-tagged"
[[ $wheel != *-any.whl ]] || fail "$wheel is tagged for any platform"

"$venv_py" - "${wheels[0]}" "$tmp/so" <<'EOF'
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as z:
    names = z.namelist()
    for want in ("cowdisk/__init__.py", "cowdisk/libcowdisk.so", "cowdisk/py.typed"):
        assert want in names, f"{want} is not in the wheel: {names}"
    libs = [n for n in names if n.endswith(".so")]
    assert libs == ["cowdisk/libcowdisk.so"], libs
    with open(sys.argv[2], "wb") as out:
        out.write(z.read("cowdisk/libcowdisk.so"))
EOF
size=$(stat -c %s "$tmp/so")
echo "    cowdisk/libcowdisk.so: $size bytes; $(file -b "$tmp/so" | cut -d, -f1-2)"
if readelf -S "$tmp/so" | grep -q '\.debug_'; then
    fail "cowdisk/libcowdisk.so in the wheel has debug sections"
fi
[[ $size -lt $MAX_SO_BYTES ]] || fail "cowdisk/libcowdisk.so is $size bytes (limit $MAX_SO_BYTES)"
readelf --dyn-syms -W "$tmp/so" | grep -qw cowdisk_open || fail "the library does not export cowdisk_open"

echo "test-pywheel: PASS"
