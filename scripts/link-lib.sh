#!/usr/bin/env bash
# Links the libraries that are installed and that the C, Go and nbdkit tests use, from
# cargo's static library, into OUTDIR:
#
#   libcowdisk.a              one relocatable object whose only global symbols are the
#                             cowdisk_* API: Rust's std and the bundled zstd are made local,
#                             so a program may also link the system libzstd (or another Rust
#                             static library) without symbol clashes
#   libcowdisk.so.X.Y.Z       SONAME libcowdisk.so.X, every export versioned by
#                             abi/cowdisk.map, plus the symlinks libcowdisk.so.X and .so
#
# Cargo's own cdylib cannot carry a SONAME plus symbol versions: rustc passes its own
# anonymous version script, which cannot be combined with named version nodes.
#
# usage: scripts/link-lib.sh CARGO_STATICLIB OUTDIR VERSION
set -euo pipefail

archive=$1 outdir=$2 version=$3
major=${version%%.*}
cc=${CC:-cc}
ld=${LD:-ld}
objcopy=${OBJCOPY:-objcopy}
ar=${AR:-ar}
# What rustc reports for this target (`--print native-static-libs`).
native_libs="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$outdir"
tmp=$(mktemp -d "$outdir/.link.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# One object holding every member of the archive (partial link), then every global
# symbol but the API made local. The .llvmbc/.llvmcmd sections (bitcode Rust embeds
# for LTO) are dropped: they are of no use to a C linker, and binutils' LLVM plugin
# aborts on bitcode from a newer LLVM than its own.
"$ld" -r --whole-archive "$archive" -o "$tmp/all.o"
"$objcopy" -w --keep-global-symbol='cowdisk_*' \
    --remove-section=.llvmbc --remove-section=.llvmcmd "$tmp/all.o" "$tmp/cowdisk.o"

rm -f "$tmp/libcowdisk.a"
"$ar" rcs "$tmp/libcowdisk.a" "$tmp/cowdisk.o"

"$cc" -shared -o "$tmp/libcowdisk.so.$version" \
    -Wl,-soname,"libcowdisk.so.$major" \
    -Wl,--version-script="$here/abi/cowdisk.map" -Wl,--gc-sections \
    "$tmp/cowdisk.o" $native_libs

mv -f "$tmp/libcowdisk.a" "$outdir/libcowdisk.a"
mv -f "$tmp/libcowdisk.so.$version" "$outdir/libcowdisk.so.$version"
ln -sfn "libcowdisk.so.$version" "$outdir/libcowdisk.so.$major"
ln -sfn "libcowdisk.so.$major" "$outdir/libcowdisk.so"
echo "linked $outdir/libcowdisk.a and libcowdisk.so.$version (SONAME libcowdisk.so.$major)"
