#!/usr/bin/env bash
# Installs cowdisk into a scratch root (`make install DESTDIR=$root PREFIX=/usr`) and
# uses it the way a user of the installed library would, from outside the repository:
#   - the layout, the SONAME, stripped binaries, the exported-symbol list;
#   - the README's C example (run twice), and a C program built only with
#     `pkg-config --cflags --libs cowdisk` (shared) and `pkg-config --static` (static),
#     next to the system libzstd, in both link orders;
#   - a Go program using the binding's default (pkg-config) linking;
#   - plain python3 importing the binding with the library found on the system path;
#   - the nbdkit plugin loading from the plugin directory;
#   - `make uninstall` removing every file.
# Run by `make test-install` (after `make all`).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/Cargo.toml" | head -1)
major=${version%%.*}
# A fixed root: the go tool caches a cgo package with the flags pkg-config gave it
# without hashing pkg-config's answer, so a new root each run would leave it linking
# with -L of a deleted one.
root=$here/build/install-root
rm -rf "$root" && mkdir -p "$root"
work=$(mktemp -d /tmp/cowdisk-install-use.XXXXXX)
trap 'rm -rf "$root" "$work"' EXIT
fail() { echo "test-install: FAIL: $*" >&2; exit 1; }
step() { printf -- '--- %s\n' "$*"; }

# Where nbdkit looks for plugins, asked before PKG_CONFIG_* below point at $root only.
plugindir=$(pkg-config --variable=plugindir nbdkit 2>/dev/null || true)
make -C "$here" --no-print-directory install DESTDIR="$root" PREFIX=/usr NBDKIT_PLUGINDIR="$plugindir" >"$work/install.log" 2>&1 \
    || { cat "$work/install.log"; fail "make install"; }
lib=$root/usr/lib

step "layout"
for f in usr/lib/libcowdisk.so.$version usr/lib/libcowdisk.a usr/include/cowdisk.h \
         usr/lib/pkgconfig/cowdisk.pc usr/bin/cowdisk usr/share/man/man1/cowdisk.1 \
         usr/share/man/man1/cowdisk-convert.1; do
    [[ -f $root/$f ]] || fail "$f was not installed"
done
[[ $(readlink "$lib/libcowdisk.so.$major") == "libcowdisk.so.$version" ]] || fail "libcowdisk.so.$major symlink"
[[ $(readlink "$lib/libcowdisk.so") == "libcowdisk.so.$major" ]] || fail "libcowdisk.so symlink"
soname=$(readelf -d "$lib/libcowdisk.so.$version" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[[ $soname == "libcowdisk.so.$major" ]] || fail "SONAME is '$soname', not libcowdisk.so.$major"
echo "SONAME $soname"
for f in "$lib/libcowdisk.so.$version" "$root/usr/bin/cowdisk"; do
    if readelf -S --wide "$f" | grep -q '\.debug_info'; then fail "$f is not stripped"; fi
done
if readelf -S --wide "$lib/libcowdisk.a" | grep -q '\.debug_info'; then fail "libcowdisk.a keeps debug info"; fi
echo "stripped: libcowdisk.so $(( $(stat -c %s "$lib/libcowdisk.so.$version") / 1024 )) KiB," \
     "libcowdisk.a $(( $(stat -c %s "$lib/libcowdisk.a") / 1024 )) KiB," \
     "cowdisk $(( $(stat -c %s "$root/usr/bin/cowdisk") / 1024 )) KiB"
man -l "$root/usr/share/man/man1/cowdisk-create.1" 2>/dev/null | grep -q 'cowdisk create' \
    || grep -q 'cowdisk create' "$root/usr/share/man/man1/cowdisk-create.1" || fail "cowdisk-create.1"
"$root/usr/bin/cowdisk" --version | grep -qx "cowdisk $version" || fail "cowdisk --version"

step "exported symbols of the installed library"
"$here/scripts/check-abi.sh" "$lib"

# pkg-config as a user of the installed tree sees it: paths inside $root.
export PKG_CONFIG_PATH=$lib/pkgconfig PKG_CONFIG_SYSROOT_DIR=$root
export PKG_CONFIG_LIBDIR=$lib/pkgconfig
[[ $(pkg-config --modversion cowdisk) == "$version" ]] || fail "pkg-config --modversion"
cflags=$(pkg-config --cflags cowdisk)
cd "$work"
src=$here/tests/install/zstd_side_by_side.c

step "C, shared: cc ... \$(pkg-config --cflags --libs cowdisk) -lzstd"
cc -std=c11 -Wall -Wextra -Werror -o shared "$src" $(pkg-config --cflags --libs cowdisk) -lzstd
readelf -d shared | grep -q "NEEDED.*\[libcowdisk.so.$major\]" || fail "shared program does not need libcowdisk.so.$major"
LD_LIBRARY_PATH=$lib ldd ./shared | grep -q "libcowdisk.so.$major => $lib/" || fail "ld.so does not find the installed library"
LD_LIBRARY_PATH=$lib ./shared shared.qcow2
qemu-img check -q shared.qcow2

step "C, static: pkg-config --static, system libzstd linked before and after"
static_libs=$(pkg-config --static --libs cowdisk | sed 's/-lcowdisk/-Wl,-Bstatic -lcowdisk -Wl,-Bdynamic/')
cc -std=c11 -Wall -Wextra -Werror -o static1 "$src" $cflags $static_libs -lzstd
cc -std=c11 -Wall -Wextra -Werror -o static2 "$src" $cflags -lzstd $static_libs
for bin in static1 static2; do
    if readelf -d $bin | grep -q 'NEEDED.*libcowdisk'; then fail "$bin links libcowdisk dynamically"; fi
    readelf -d $bin | grep -q 'NEEDED.*libzstd' || fail "$bin does not use the system libzstd"
    ./$bin $bin.qcow2
    qemu-img check -q $bin.qcow2
done

step "the README's C example, built with pkg-config, run twice"
python3 - "$here/README.md" > hello.c <<'PY'
import re, sys
text = open(sys.argv[1]).read()
print(re.search(r"```c\n(#include <errno.h>.*?)```", text, re.S).group(1), end="")
PY
cc -std=c11 -Wall -Wextra -Werror -o hello hello.c $(pkg-config --cflags --libs cowdisk)
LD_LIBRARY_PATH=$lib ./hello | grep -qx hello || fail "README example, first run"
LD_LIBRARY_PATH=$lib ./hello | grep -qx hello || fail "README example, second run"
qemu-img check -q disk.qcow2

step "Go, default linking (#cgo pkg-config: cowdisk), outside the repository"
mkdir -p goprog && cp "$here/tests/install/goprog/main.go" goprog/
( cd goprog
  cat > go.mod <<GOMOD
module example.com/goprog

go 1.19

require cowdisk.dev/cowdisk v0.0.0

replace cowdisk.dev/cowdisk => $here/bindings/go
GOMOD
  GOFLAGS=-mod=mod CGO_ENABLED=1 go build -o goprog . )
readelf -d goprog/goprog | grep -q "NEEDED.*\[libcowdisk.so.$major\]" || fail "go program does not need libcowdisk.so.$major"
LD_LIBRARY_PATH=$lib goprog/goprog go.qcow2
qemu-img check -q go.qcow2

step "Python, the binding outside the repository, the library from the system path"
mkdir -p site && cp -r "$here/bindings/python/cowdisk" site/
rm -f site/cowdisk/libcowdisk.so*
env -u COWDISK_LIB LD_LIBRARY_PATH="$lib" PYTHONPATH="$work/site" python3 - "$lib" <<'PY'
import os, sys
import cowdisk
lib = os.path.realpath(sys.argv[1])
# Whatever name the loader used, the library mapped into this process is the installed one.
mapped = {line.split()[-1] for line in open("/proc/self/maps") if "libcowdisk" in line}
assert mapped and all(os.path.realpath(m).startswith(lib + "/") for m in mapped), mapped
cowdisk.create("py.qcow2", 1 << 24)
with cowdisk.open("py.qcow2") as img:
    img.pwrite(b"python" * 100, 8192)
    assert img.pread(600, 8192) == b"python" * 100
print("python with", cowdisk.library_path, "ok")
PY
qemu-img check -q py.qcow2

if [[ -n $plugindir && -f $root$plugindir/nbdkit-cowdisk-plugin.so ]]; then
    step "nbdkit plugin from the installed plugin directory"
    if readelf -d "$root$plugindir/nbdkit-cowdisk-plugin.so" | grep -q "R.*PATH.*$here"; then
        fail "installed plugin keeps a build-tree rpath"
    fi
    LD_LIBRARY_PATH=$lib nbdkit --dump-plugin "$root$plugindir/nbdkit-cowdisk-plugin.so" | grep -q '^name=cowdisk' \
        || fail "nbdkit cannot load the installed plugin"
else
    echo "(nbdkit not installed: plugin installation not tested)"
fi

step "make uninstall"
make -C "$here" --no-print-directory uninstall DESTDIR="$root" PREFIX=/usr NBDKIT_PLUGINDIR="$plugindir" >"$work/uninstall.log" 2>&1 \
    || { cat "$work/uninstall.log"; fail "make uninstall"; }
left=$(find "$root" -not -type d)
[[ -z $left ]] || fail "make uninstall left: $left"
echo "test-install: PASS"
