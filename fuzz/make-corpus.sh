#!/usr/bin/env bash
# Makes the seed corpus of the fuzz targets from images qemu-img and qemu-io build:
# several versions, cluster sizes and refcount widths, data, zero clusters,
# compressed clusters (zlib and zstd), snapshots, a backing file name, lazy refcounts.
# Each seed is the harness's input format: u32 little-endian image length, the image,
# then a script of operations (see harness.rs).
set -euo pipefail
out=${1:-$(dirname "$0")/corpus}
mkdir -p "$out/image" "$out/header"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A script: bytes of opcodes and arguments, from a fixed pseudo-random stream.
script() { head -c "$1" /dev/urandom; }

seed() {
    local name=$1 img=$2
    local len
    len=$(stat -c %s "$img")
    for target in image header; do
        {
            printf "%08x" "$len" | sed 's/\(..\)\(..\)\(..\)\(..\)/\4\3\2\1/' | xxd -r -p
            cat "$img"
            if [ "$target" = image ]; then script 200; fi
        } > "$out/$target/$name"
    done
}

n=0
for spec in "512 1.1 16" "512 0.10 16" "4096 1.1 1" "4096 1.1 64" "65536 1.1 16" "1024 1.1 8"; do
    set -- $spec
    cs=$1 compat=$2 rb=$3
    img=$tmp/i$n.qcow2
    qemu-img create -q -f qcow2 -o cluster_size=$cs,compat=$compat,refcount_bits=$rb "$img" 1M
    qemu-io -f qcow2 -c "write -P 0x11 0 8k" -c "write -P 0x22 300k 3k" "$img" >/dev/null
    if [ "$compat" = 1.1 ]; then
        qemu-io -f qcow2 -c "write -z 64k 64k" "$img" >/dev/null
        qemu-io -f qcow2 -c "write -c 512k $cs" "$img" >/dev/null
    fi
    seed "plain-$cs-$compat-$rb" "$img"
    # Large clusters make large inputs, which slow the fuzzer: no snapshot variant.
    if [ "$cs" -ge 65536 ]; then n=$((n + 1)); continue; fi
    if ! qemu-img snapshot -c snap1 "$img" 2>/dev/null; then n=$((n + 1)); continue; fi  # 1-bit refcounts
    qemu-io -f qcow2 -c "write -P 0x33 4k 4k" "$img" >/dev/null
    qemu-img snapshot -c snap2 "$img"
    seed "snap-$cs-$compat-$rb" "$img"
    n=$((n + 1))
done
img=$tmp/zstd.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4096,compression_type=zstd "$img" 1M
qemu-io -f qcow2 -c "write -c 0 4k" -c "write -c 8k 4k" "$img" >/dev/null
seed zstd "$img"
img=$tmp/backing.qcow2
qemu-img create -q -u -f qcow2 -o cluster_size=4096 -b /nonexistent/base.raw -F raw "$img" 1M
seed backing-name "$img"
img=$tmp/lazy.qcow2
qemu-img create -q -f qcow2 -o cluster_size=4096,lazy_refcounts=on "$img" 1M
seed lazy "$img"
echo "seed corpus in $out: $(ls "$out/image" | wc -l) images"
