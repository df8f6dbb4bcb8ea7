#!/usr/bin/env bash
# The "nbd" section of make bench (issue 17): the same qcow2 image served by nbdkit +
# the cowdisk plugin and by qemu-nbd, driven by the same clients (nbdcopy, qemu-img
# bench on nbd+unix://), tools alternating in every run; and the cost of the NBD hop
# (cowdisk bench on the image vs qemu-img bench through the plugin's export).
# Prints a Markdown section on stdout. Environment: BENCH_DIR, BENCH_RUNS (as bench.sh).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cowdisk="$top/target/release/cowdisk"
plugin="$top/build/nbdkit/nbdkit-cowdisk-plugin.so"
dir=${BENCH_DIR:-$top/build/bench}/nbd
runs=${BENCH_RUNS:-3}
size_mib=${BENCH_NBD_MIB:-1024}
[ -x "$cowdisk" ] && [ -f "$plugin" ] || { echo "bench-nbd: build first (make)" >&2; exit 1; }
rm -rf "$dir"; mkdir -p "$dir"
sock="$dir/nbd.sock"

source "$top/scripts/bench-lib.sh"

# start TOOL CACHE IMAGE: serve IMAGE on $sock; TOOL is cowdisk or qemu.
start() {
    rm -f "$sock" "$dir/pid"
    if [[ $1 == cowdisk ]]; then
        local direct=false; [[ $2 == none ]] && direct=true
        nbdkit -U "$sock" -P "$dir/pid" "$plugin" "file=$3" "direct=$direct" >&2
    else
        qemu-nbd -f qcow2 -k "$sock" --cache="$2" --aio=threads --shared=16 \
            --pid-file="$dir/pid" --fork "$3" >&2
    fi
    for _ in $(seq 500); do [[ -S $sock && -s $dir/pid ]] && return; sleep 0.01; done
    echo "bench-nbd: $1 did not start" >&2; exit 1
}
stop() {
    local pid; pid=$(cat "$dir/pid")
    kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.01; done
}
uri="nbd+unix:///?socket=$sock"

src="$dir/src.raw"
head -c $((size_mib << 20)) /dev/urandom > "$src"
full="$dir/full.qcow2"
qemu-img convert -q -f raw -O qcow2 "$src" "$full"

# case NAME KIND CMD...: one timed client command per tool and run; KIND "write"
# starts each run from a new empty image, "read" serves $full.
declare -a rows=()
bench_case() {
    local name=$1 kind=$2 cache=$3; shift 3
    local -A t=()
    for r in $(seq "$runs"); do
        local order=(cowdisk qemu); (( r % 2 )) || order=(qemu cowdisk)
        for tool in "${order[@]}"; do
            local img=$full
            if [[ $kind == write ]]; then
                img="$dir/w.qcow2"; rm -f "$img"
                qemu-img create -q -f qcow2 "$img" "${size_mib}M"
            fi
            start "$tool" "$cache" "$img"
            local s; s=$(now)
            "$@" >/dev/null 2>&1 || { echo "bench-nbd: $* failed ($tool)" >&2; stop; exit 1; }
            t[$tool]+="$(since "$s") "
            stop
            if [[ $kind == write ]]; then
                qemu-img check -q "$img" || { echo "bench-nbd: $tool left a bad image" >&2; exit 1; }
            fi
        done
    done
    local c q
    c=$(printf '%s\n' ${t[cowdisk]} | median); q=$(printf '%s\n' ${t[qemu]} | median)
    local goal=1.0; [[ $kind == write ]] && goal=0.8
    local rt; rt=$(ratio "$c" "$q")
    rows+=("| $name | $cache | $c ($(printf '%s\n' ${t[cowdisk]} | spread)) | $q ($(printf '%s\n' ${t[qemu]} | spread)) | **$rt** | ≤ $goal | $(met "$rt" $goal) |")
}

qb() { qemu-img bench -f raw "$@" "$uri"; }
n4k=$(( (size_mib << 20) / 65536 ))
n64k=$(( (size_mib << 20) / 65536 ))
for cache in writeback none; do
    bench_case "nbdcopy export → null (read all)" read "$cache" nbdcopy "$uri" null:
    bench_case "nbdcopy raw → export (write all, flushed)" write "$cache" nbdcopy --flush "$src" "$uri"
    for d in 1 16; do
        bench_case "qemu-img bench 4 KiB at 64 KiB step, read, -d $d" read "$cache" \
            qb -c "$n4k" -d "$d" -s 4k -S 64k
        bench_case "qemu-img bench 64 KiB sequential, read, -d $d" read "$cache" \
            qb -c "$n64k" -d "$d" -s 64k
        bench_case "qemu-img bench 4 KiB at 64 KiB step, write, -d $d" write "$cache" \
            qb -w -c "$n4k" -d "$d" -s 4k -S 64k
        bench_case "qemu-img bench 64 KiB sequential, write, -d $d" write "$cache" \
            qb -w -c "$n64k" -d "$d" -s 64k
    done
done

# The NBD hop: the same requests through the library directly and through the export.
declare -a hop=()
for spec in "read -d 1 -s 4k -S 64k" "read -d 16 -s 64k" "write -d 16 -s 64k"; do
    set -- $spec
    rw=$1; shift
    w=(); [[ $rw == write ]] && w=(-w)
    tl=(); te=()
    for _ in $(seq "$runs"); do
        img=$full
        if [[ $rw == write ]]; then img="$dir/w.qcow2"; rm -f "$img"; qemu-img create -q -f qcow2 "$img" "${size_mib}M"; fi
        tl+=("$("$cowdisk" bench "${w[@]}" -c "$n64k" "$@" "$img" | bench_seconds)")
        if [[ $rw == write ]]; then rm -f "$img"; qemu-img create -q -f qcow2 "$img" "${size_mib}M"; fi
        start cowdisk writeback "$img"
        te+=("$(qb "${w[@]}" -c "$n64k" "$@" | bench_seconds)")
        stop
    done
    l=$(printf '%s\n' "${tl[@]}" | median); e=$(printf '%s\n' "${te[@]}" | median)
    hop+=("| $rw $* | $l | $e | $(ratio "$e" "$l") |")
done

cat <<EOF

## NBD export (issue 17)

A ${size_mib} MiB qcow2 image (64 KiB clusters) served on a Unix socket by \`nbdkit
nbdkit-cowdisk-plugin.so file=IMG [direct=true]\` and by \`qemu-nbd -f qcow2
--cache=writeback|none --aio=threads --shared=16\`, the same client command timed for
each, tools alternating in every run ($runs runs). Reads serve a fully allocated image
of random data (in the page cache with writeback); writes start from a new empty image
each run, and every image written was checked with \`qemu-img check\`. \`nbdcopy\` uses 4
connections against both (both advertise multi-conn) and \`--flush\` when writing.
Seconds: median (min–max); ratio cowdisk / qemu-nbd.

| workload | cache | nbdkit + cowdisk s | qemu-nbd s | ratio | goal | met |
|---|---|---|---|---|---|---|
$(printf '%s\n' "${rows[@]}")

The cost of the NBD hop: \`cowdisk bench\` on the image (library calls, writeback) against
\`qemu-img bench -f raw\` of the same requests through the plugin's export ($n64k requests).

| requests | library s | through NBD s | NBD / library |
|---|---|---|---|
$(printf '%s\n' "${hop[@]}")
EOF
rm -rf "$dir"
