#!/usr/bin/env bash
# make bench: run cowdisk and qemu-img on the same workloads in the same run, several
# times each, and write the medians and ratios (cowdisk time / QEMU time; below 1.0
# means cowdisk is faster) to BENCHMARKS.md.
#
# Sections: "bench" (qemu-img bench workloads), "compress" (1 GiB of mixed data through
# compressed writes vs qemu-img convert -c, issue 5), "vmstate" (2 GiB of VM state in
# realistic pieces, pool vs unbuffered vs dd, issue 6), "integrity" (what the overlap
# checks cost on workloads 1-4, and mapping an empty 1 PiB image, issue 11), "bitmaps"
# (what keeping 1 and 8 persistent bitmaps costs on workloads 1-2, issue 16), "convert"
# (qemu-img convert against cowdisk convert on 1 GiB of mixed data, issue 12), "nbd"
# (nbdkit + the cowdisk plugin against qemu-nbd, scripts/bench-nbd.sh, issue 17).
#
# Environment: BENCH_DIR (scratch folder on a real disk, default build/bench — O_DIRECT
# does not work on tmpfs), BENCH_RUNS (runs per tool and workload, default 3),
# BENCH_OUT (default BENCHMARKS.md), BENCH_ONLY (comma-separated sections to run, default
# all; BENCHMARKS.md then holds only those), BENCH_VMSTATE_SLOW_MIB (MiB the slow
# unbuffered O_DIRECT VM state path saves, scaled to 2 GiB; default 512, 2048 = no
# scaling).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cowdisk="$top/target/release/cowdisk"
dir=${BENCH_DIR:-$top/build/bench}
runs=${BENCH_RUNS:-3}
out=${BENCH_OUT:-$top/BENCHMARKS.md}
only=${BENCH_ONLY:-bench,compress,vmstate,integrity,bitmaps,convert,encryption,nbd}
slow_mib=${BENCH_VMSTATE_SLOW_MIB:-512}
mkdir -p "$dir"
[ -x "$cowdisk" ] || { echo "bench: build first (make)"; exit 1; }

rows=()

# now, since, ratio, met, median, spread, bench_seconds
source "$top/scripts/bench-lib.sh"

# section <name>: whether BENCH_ONLY selects the section.
section() { [[ ",$only," == *",$1,"* ]]; }

# cowdisk_time <args...>: runs a cowdisk benchmark subcommand, prints its own time.
cowdisk_time() { "$cowdisk" "$@" | bench_seconds; }

# dd_time <dd args...>: runs dd, prints the seconds it reports.
dd_time() {
    LC_ALL=C dd "$@" 2>&1 | sed -n 's/.* copied, \([0-9.e+-]*\) s,.*/\1/p' |
        awk '{ printf "%.3f\n", $1 }'
}

# Medians per key: times[key] collects "t1 t2 ..." and med prints their median.
declare -A times=()
med() { printf '%s\n' ${times[$1]} | median; }


# seconds <tool> <image> <bench args...>: runs one benchmark, prints its time.
seconds() {
    local tool=$1 image=$2; shift 2
    if [ "$tool" = qemu ]; then
        qemu-img bench -f qcow2 "$@" "$image" | bench_seconds
    else
        "$cowdisk" bench "$@" "$image" | bench_seconds
    fi
}

# workload <name> <goal> <fresh|IMAGE> <bench args...>: runs both tools $runs times,
# alternating, on a fresh empty 8 GiB image per run ("fresh") or on IMAGE.
workload() {
    local name=$1 goal=$2 image=$3; shift 3
    local q=() c=()
    echo "== $name: qemu-img bench / cowdisk bench $*"
    for ((i = 0; i < runs; i++)); do
        for tool in qemu cowdisk; do
            local img=$image
            if [ "$image" = fresh ]; then
                img="$dir/fresh.qcow2"
                rm -f "$img"
                qemu-img create -q -f qcow2 "$img" 8G
            fi
            sync
            t=$(seconds $tool "$img" "$@")
            echo "   $tool run $((i + 1)): $t s"
            if [ $tool = qemu ]; then q+=("$t"); else c+=("$t"); fi
        done
    done
    local qm cm ratio met
    qm=$(printf '%s\n' "${q[@]}" | median)
    cm=$(printf '%s\n' "${c[@]}" | median)
    ratio=$(awk -v c="$cm" -v q="$qm" 'BEGIN { printf "%.2f", c / q }')
    met=$(awk -v r="$ratio" -v g="$goal" 'BEGIN { print (r <= g) ? "yes" : "**no**" }')
    rows+=("| $name | \`$*\` | $cm | $qm | $ratio | ≤ $goal | $met |")
}

echo "bench: scratch folder $dir, $runs runs per tool, sections $only"
start_all=$(now)

if section bench; then
    full="$dir/full-4g.qcow2"
    if [ ! -f "$full" ]; then
        echo "bench: creating a fully allocated 4 GiB image (preallocation=full)"
        qemu-img create -q -f qcow2 -o preallocation=full "$full" 4G
    fi

    workload "1. 4 KiB sequential allocating writes" 0.8 fresh -w -c 65536 -s 4k -d 1 -t none
    workload "1. 4 KiB sequential allocating writes" 0.8 fresh -w -c 65536 -s 4k -d 1 -t writeback
    workload "2. 4 KiB writes at 64 KiB step (allocate + COW)" 0.8 fresh -w -c 65536 -s 4k -S 64k -d 1 -t none
    workload "2. 4 KiB writes at 64 KiB step (allocate + COW)" 0.8 fresh -w -c 65536 -s 4k -S 64k -d 1 -t writeback
    workload "3. 4 KiB reads at 64 KiB step, allocated 4 GiB" 1.0 "$full" -c 65536 -s 4k -S 64k -d 1 -t none
    workload "3. sequential 64 KiB reads, allocated 4 GiB" 1.0 "$full" -c 65536 -s 64k -d 1 -t none
    workload "3. sequential 64 KiB reads, allocated 4 GiB" 1.0 "$full" -c 65536 -s 64k -d 1 -t writeback
    workload "4. workload 2 with 8 in flight" 0.8 fresh -w -c 65536 -s 4k -S 64k -d 8 -t none
    workload "4. workload 3 (4 KiB reads) with 8 in flight" 1.0 "$full" -c 65536 -s 4k -S 64k -d 8 -t none
    # Beyond the issue: reads of a compressed image (decompression runs without the lock).
    raw="$dir/mixed-1g.raw"
    if [ "$(stat -c %s "$raw" 2>/dev/null || echo 0)" != 1073741824 ]; then
        echo "bench: generating 1 GiB of mixed data"
        python3 "$top/scripts/mixed-data.py" "$raw"
    fi
    zimg="$dir/compressed-1g.qcow2"
    if [ ! -f "$zimg" ]; then
        echo "bench: creating a zlib-compressed image of the mixed data"
        qemu-img convert -c -O qcow2 -f raw "$raw" "$zimg"
    fi
    workload "5. sequential 64 KiB reads, compressed 1 GiB" 1.0 "$zimg" -c 16384 -s 64k -d 1 -t writeback
    workload "5. sequential 64 KiB reads, compressed 1 GiB" 1.0 "$zimg" -c 16384 -s 64k -d 8 -t writeback
fi

# ---- compression (issue 5) ----------------------------------------------------------
# 1 GiB of mixed data (1 MiB blocks in turn: zeros, text, random) converted into a new
# compressed image, zlib, 64 KiB clusters: qemu-img convert -c against cowdisk
# bench-compress (Image::write_compressed), both timed from outside as whole processes.
compress_rows=()
if section compress; then
    raw="$dir/mixed-1g.raw"
    if [ "$(stat -c %s "$raw" 2>/dev/null || echo 0)" != 1073741824 ]; then
        echo "bench: generating 1 GiB of mixed data"
        python3 "$top/scripts/mixed-data.py" "$raw"
    fi
    cat "$raw" > /dev/null # both tools read it from the page cache
    cout="$dir/compressed.qcow2"
    ckeys=("qemu writeback" "qemu none" "cowdisk writeback cache" "cowdisk none cache"
        "cowdisk writeback nocache" "cowdisk none nocache")
    for ((i = 0; i < runs; i++)); do
        for key in "${ckeys[@]}"; do
            read -r tool mode cache <<< "$key"
            rm -f "$cout"
            sync
            t0=$(now)
            if [ "$tool" = qemu ]; then
                qemu-img convert -c -O qcow2 -f raw -t "$mode" "$raw" "$cout"
            else
                args=(-t "$mode")
                [ "$cache" = nocache ] && args+=(--no-cache)
                "$cowdisk" bench-compress "${args[@]}" "$raw" "$cout" > /dev/null
            fi
            t=$(since "$t0")
            echo "   compress $key run $((i + 1)): $t s"
            times[$key]+="$t "
            if [ "$i" = 0 ] && [ "$tool" = cowdisk ]; then
                # Checked once per configuration, not timed.
                qemu-img compare -q -f raw -F qcow2 "$raw" "$cout" ||
                    { echo "bench: $key: image differs from the raw file"; exit 1; }
                qemu-img check -q "$cout" || { echo "bench: $key: qemu-img check failed"; exit 1; }
            fi
        done
    done
    rm -f "$cout"
    for key in "cowdisk writeback cache" "cowdisk writeback nocache" "cowdisk none cache" \
        "cowdisk none nocache"; do
        read -r _ mode cache <<< "$key"
        opts="-t $mode"
        [ "$cache" = nocache ] && opts+=" --no-cache"
        c=$(med "$key")
        q=$(med "qemu $mode")
        r=$(ratio "$c" "$q")
        compress_rows+=("| \`$opts\` | $c | \`-t $mode\`: $q | $r | ≤ 0.5 | $(met "$r" 0.5) |")
    done
    compress_direct=$(ratio "$(med "cowdisk none cache")" "$(med "cowdisk writeback cache")")
fi

# ---- VM state (issue 6) ---------------------------------------------------------------
# 2 GiB of VM state in realistic pieces (60 % 1–100 bytes, 38 % 4096+8, some up to
# 4 MiB) saved into a fresh 1 GiB image, finalized and flushed: the write pool against
# the unbuffered path (QEMU's way), O_DIRECT and cached; dd writes 2 GiB raw as the
# disk's own speed.
vm_rows=()
if section vmstate; then
    vimg="$dir/vmstate.qcow2"
    vkeys=("pool none" "pool writeback" "unbuffered none" "unbuffered writeback" "dd none"
        "dd writeback")
    for ((i = 0; i < runs; i++)); do
        for key in "${vkeys[@]}"; do
            read -r path mode <<< "$key"
            rm -f "$vimg"
            sync
            if [ "$path" = dd ]; then
                flags=(conv=fsync)
                [ "$mode" = none ] && flags+=(oflag=direct)
                t=$(dd_time if=/dev/zero of="$vimg" bs=1M count=2048 "${flags[@]}")
            else
                qemu-img create -q -f qcow2 "$vimg" 1G
                sync
                args=(-t "$mode")
                size=2G
                [ "$path" = unbuffered ] && args+=(--unbuffered)
                if [ "$path" = unbuffered ] && [ "$mode" = none ] && [ "$slow_mib" != 2048 ]; then
                    size=${slow_mib}M
                fi
                t=$(cowdisk_time bench-vmstate "${args[@]}" --size "$size" "$vimg")
                if [ "$size" != 2G ]; then
                    t=$(awk -v t="$t" -v m="$slow_mib" 'BEGIN { printf "%.3f", t * 2048 / m }')
                fi
            fi
            echo "   vmstate $key run $((i + 1)): $t s"
            times[$key]+="$t "
        done
    done
    rm -f "$vimg"
    scaled=""
    [ "$slow_mib" != 2048 ] && scaled=" (measured on $slow_mib MiB, × $((2048 / slow_mib)))"
    for mode in none writeback; do
        p=$(med "pool $mode")
        u=$(med "unbuffered $mode")
        d=$(med "dd $mode")
        note=""
        [ "$mode" = none ] && note=$scaled
        vm_rows+=("| \`-t $mode\` | $p | $u$note | $d | $(ratio "$p" "$u") | $(ratio "$p" "$d") |")
    done
    vm_speedup=$(ratio "$(med "pool none")" "$(med "unbuffered none")")
    vm_vs_dd=$(ratio "$(med "pool none")" "$(med "dd none")")
fi
# ---- integrity (issue 11) -------------------------------------------------------------
# Workloads 1-4 through cowdisk with the overlap checks on (the default) and off
# (--no-overlap-check), alternating; and `map` of an empty 1 PiB image.
overlap_rows=()
if section integrity; then
    full="$dir/full-4g.qcow2"
    if [ ! -f "$full" ]; then
        qemu-img create -q -f qcow2 -o preallocation=full "$full" 4G
    fi
    overlap() {
        local name=$1 image=$2; shift 2
        local on=() off=()
        echo "== overlap checks: $name: cowdisk bench $*"
        for ((i = 0; i < runs; i++)); do
            for mode in on off; do
                local img=$image
                if [ "$image" = fresh ]; then
                    img="$dir/fresh.qcow2"
                    rm -f "$img"
                    qemu-img create -q -f qcow2 "$img" 8G
                fi
                sync
                local extra=()
                [ $mode = off ] && extra=(--no-overlap-check)
                t=$(seconds cowdisk "$img" "$@" "${extra[@]}")
                echo "   checks $mode run $((i + 1)): $t s"
                if [ $mode = on ]; then on+=("$t"); else off+=("$t"); fi
            done
        done
        local a b r
        a=$(printf '%s\n' "${on[@]}" | median)
        b=$(printf '%s\n' "${off[@]}" | median)
        r=$(ratio "$a" "$b")
        overlap_rows+=("| $name | \`$*\` | $a | $b | $r | ≤ 1.03 | $(met "$r" 1.03) |")
    }
    overlap "1. 4 KiB sequential allocating writes" fresh -w -c 65536 -s 4k -d 1 -t none
    overlap "1. 4 KiB sequential allocating writes" fresh -w -c 65536 -s 4k -d 1 -t writeback
    overlap "2. 4 KiB writes at 64 KiB step" fresh -w -c 65536 -s 4k -S 64k -d 1 -t none
    overlap "2. 4 KiB writes at 64 KiB step" fresh -w -c 65536 -s 4k -S 64k -d 1 -t writeback
    overlap "3. 4 KiB reads at 64 KiB step" "$full" -c 65536 -s 4k -S 64k -d 1 -t none
    overlap "3. sequential 64 KiB reads" "$full" -c 65536 -s 64k -d 1 -t writeback
    overlap "4. workload 2 with 8 in flight" fresh -w -c 65536 -s 4k -S 64k -d 8 -t none
    big="$dir/empty-1p.qcow2"
    rm -f "$big"
    qemu-img create -q -f qcow2 "$big" 1P
    for ((i = 0; i < runs; i++)); do
        t0=$(now); "$cowdisk" map --output=json "$big" > /dev/null; times["map cowdisk"]+="$(since "$t0") "
    done
    t0=$(now); qemu-img map --output=json "$big" > /dev/null; map_qemu=$(since "$t0")
    map_cowdisk=$(med "map cowdisk")
    rm -f "$big"
fi
# ---- bitmaps (issue 16) ----------------------------------------------------------------
# Workloads 1-2 through cowdisk on fresh images with 0, 1 and 8 persistent dirty bitmaps
# (added by qemu-img bitmap --add, 64 KiB granularity), alternating, each timed as a
# whole process (opening marks the bitmaps in use, closing stores them).
bitmap_rows=()
if section bitmaps; then
    bitmaps_cost() {
        local name=$1; shift
        local -a l0 l1 l8 w0 w8
        echo "== bitmaps: $name: cowdisk bench $*"
        for ((i = 0; i < runs; i++)); do
            for n in 0 1 8; do
                local img="$dir/bitmaps.qcow2"
                rm -f "$img"
                qemu-img create -q -f qcow2 "$img" 8G
                for ((b = 0; b < n; b++)); do qemu-img bitmap --add "$img" "b$b"; done
                sync
                # The requests as cowdisk bench times them (qemu-img bench's measure),
                # and the whole process: opening (marking the bitmaps in use, three
                # syncs) and closing (storing them) included.
                t0=$(now); loop=$("$cowdisk" bench -q "$@" "$img"); whole=$(since "$t0")
                echo "   $n bitmaps run $((i + 1)): $loop s requests, $whole s process"
                case $n in
                    0) l0+=("$loop"); w0+=("$whole") ;;
                    1) l1+=("$loop") ;;
                    8) l8+=("$loop"); w8+=("$whole") ;;
                esac
            done
        done
        local a b c d e
        a=$(printf '%s\n' "${l0[@]}" | median)
        b=$(printf '%s\n' "${l1[@]}" | median)
        c=$(printf '%s\n' "${l8[@]}" | median)
        d=$(printf '%s\n' "${w0[@]}" | median)
        e=$(printf '%s\n' "${w8[@]}" | median)
        local r1 r8 rw
        r1=$(ratio "$b" "$a")
        r8=$(ratio "$c" "$a")
        rw=$(ratio "$e" "$d")
        bitmap_rows+=("| $name | \`$*\` | $a | $b | $c | $r1 | $r8 | ≤ 1.05 | $(met "$r8" 1.05) | $d | $e | $rw |")
    }
    bitmaps_cost "1. 4 KiB sequential allocating writes" -w -c 65536 -s 4k -d 1 -t none
    bitmaps_cost "1. 4 KiB sequential allocating writes" -w -c 65536 -s 4k -d 1 -t writeback
    bitmaps_cost "2. 4 KiB writes at 64 KiB step (allocate + COW)" -w -c 65536 -s 4k -S 64k -d 1 -t none
    bitmaps_cost "2. 4 KiB writes at 64 KiB step (allocate + COW)" -w -c 65536 -s 4k -S 64k -d 1 -t writeback
fi
# ---- convert (issue 12) ----------------------------------------------------------------
# A 2 GiB qcow2 image holding the 1 GiB of mixed data (zeros written as data, text,
# random) in its first half and holes in the second, converted by qemu-img and cowdisk
# in the same run, alternating, each timed as a whole process (the target flushed).
convert_rows=()
if section convert; then
    raw="$dir/mixed-1g.raw"
    if [ "$(stat -c %s "$raw" 2>/dev/null || echo 0)" != 1073741824 ]; then
        echo "bench: generating 1 GiB of mixed data"
        python3 "$top/scripts/mixed-data.py" "$raw"
    fi
    csrc="$dir/convert-src.qcow2"
    if [ ! -f "$csrc" ]; then
        qemu-img create -q -f qcow2 "$csrc" 2G
        qemu-img convert -q -n -S 0 -f raw -O qcow2 "$raw" "$csrc"
    fi
    zimg="$dir/compressed-1g.qcow2"
    if [ ! -f "$zimg" ]; then
        qemu-img convert -c -O qcow2 -f raw "$raw" "$zimg"
    fi
    cat "$raw" "$csrc" "$zimg" > /dev/null
    cdst="$dir/convert-dst"
    # cases: key | goal | source | qemu-img args | cowdisk args
    # qemu-img convert never flushes its target by default (cache=unsafe); cowdisk
    # flushes unless -t unsafe. Rows compare like with like.
    cases=(
        "qcow2 to qcow2, not flushed (qemu-img's default)|0.8|$csrc|-O qcow2|-t unsafe"
        "qcow2 to qcow2, flushed|0.8|$csrc|-O qcow2 -t writeback|"
        "qcow2 to qcow2 against qemu-img -m 8 -W|1.0|$csrc|-O qcow2 -m 8 -W|-t unsafe"
        "qcow2 to raw|0.8|$csrc|-O raw|-O raw -t unsafe"
        "raw to qcow2|0.8|$raw|-f raw -O qcow2|-f raw -t unsafe"
        "-c zlib|0.5|$csrc|-O qcow2 -c|-c -t unsafe"
        "-c zstd|0.8|$csrc|-O qcow2 -c -o compression_type=zstd|-c -o compression_type=zstd -t unsafe"
        "target -t none (flushed)|0.8|$csrc|-O qcow2 -t none|-t none"
        "zlib-compressed source to raw|0.8|$zimg|-O raw|-O raw -t unsafe"
    )
    for ((i = 0; i < runs; i++)); do
        for c in "${cases[@]}"; do
            IFS='|' read -r key goal src qargs cargs <<< "$c"
            for tool in qemu cowdisk; do
                rm -f "$cdst"
                sync
                t0=$(now)
                if [ $tool = qemu ]; then
                    # shellcheck disable=SC2086
                    qemu-img convert $qargs "$src" "$cdst"
                else
                    # shellcheck disable=SC2086
                    "$cowdisk" convert $cargs "$src" "$cdst"
                fi
                t=$(since "$t0")
                echo "   convert $key $tool run $((i + 1)): $t s"
                times["$tool $key"]+="$t "
                if [ "$i" = 0 ] && [ $tool = cowdisk ]; then
                    qemu-img compare -q "$src" "$cdst" ||
                        { echo "bench: convert $key: target differs from the source"; exit 1; }
                fi
            done
        done
        rm -f "$cdst"
        sync
        t=$(dd_time if="$raw" of="$cdst" bs=2M conv=fsync)
        echo "   convert dd run $((i + 1)): $t s"
        times[dd]+="$t "
    done
    rm -f "$cdst"
    for c in "${cases[@]}"; do
        IFS='|' read -r key goal src qargs cargs <<< "$c"
        cm=$(med "cowdisk $key")
        qm=$(med "qemu $key")
        r=$(ratio "$cm" "$qm")
        spread_c=$(printf '%s\n' ${times["cowdisk $key"]} | sort -g | awk 'NR==1{a=$1} {b=$1} END {printf "%s–%s", a, b}')
        spread_q=$(printf '%s\n' ${times["qemu $key"]} | sort -g | awk 'NR==1{a=$1} {b=$1} END {printf "%s–%s", a, b}')
        convert_rows+=("| $key | \`${cargs:-(defaults)}\` | $cm ($spread_c) | \`$qargs\`: $qm ($spread_q) | $r | ≤ $goal | $(met "$r" "$goal") |")
    done
    convert_dd=$(med dd)
    convert_vs_dd=$(ratio "$(med "cowdisk qcow2 to qcow2, flushed")" "$convert_dd")
fi

# ---- encryption (issue 13) -----------------------------------------------------------
# A 1 GiB image fully written with random data, LUKS (QEMU's default aes-256-xts-plain64)
# and plain: qemu-img bench and cowdisk bench with the same secret, cached.
enc_rows=()
if section encryption; then
    eraw="$dir/random-1g.raw"
    if [ "$(stat -c %s "$eraw" 2>/dev/null || echo 0)" != 1073741824 ]; then
        head -c 1G /dev/urandom > "$eraw"
    fi
    pass="cowdisk bench passphrase"
    eimg="$dir/luks-1g.qcow2"
    pimg="$dir/plain-1g.qcow2"
    if [ ! -f "$eimg" ]; then
        qemu-img convert -f raw -O qcow2 --object "secret,id=s0,data=$pass" \
            -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 "$eraw" "$eimg"
    fi
    [ -f "$pimg" ] || qemu-img convert -f raw -O qcow2 "$eraw" "$pimg"
    # qemu-img bench cannot open encrypted images (it takes no --object), so QEMU runs
    # the same requests as a qemu-io script: `read`/`write` one at a time for -d 1,
    # batches of 8 `aio_read`/`aio_write` then `aio_flush` for -d 8. Both tools are timed
    # as whole processes (open included: ~10 ms of key derivation at iter-time 10).
    ecases=("64 KiB sequential reads|-c 16384 -s 64k -d 1"
        "64 KiB sequential reads|-c 16384 -s 64k -d 8"
        "64 KiB sequential writes (in place)|-w -c 16384 -s 64k -d 1"
        "64 KiB sequential writes (in place)|-w -c 16384 -s 64k -d 8"
        "4 KiB reads at 1 MiB step (scattered)|-c 65536 -s 4k -S 1M -d 1"
        "4 KiB reads at 1 MiB step (scattered)|-c 65536 -s 4k -S 1M -d 8")
    # qio_script <args...>: the qemu-io commands doing what `cowdisk bench ARGS` does.
    qio_script() {
        python3 - "$@" <<'PY'
import sys
a = sys.argv[1:]
write = "-w" in a
val = lambda f, d: a[a.index(f) + 1] if f in a else d
units = {"k": 1 << 10, "M": 1 << 20}
size_of = lambda v: int(v[:-1]) * units[v[-1]] if v[-1] in units else int(v)
count, size, depth = int(val("-c", "1")), size_of(val("-s", "4k")), int(val("-d", "1"))
step, disk = size_of(val("-S", val("-s", "4k"))), 1 << 30
op = "write -q -P 0" if write else "read -q"
aop = "aio_write -q -P 0" if write else "aio_read -q"
for i in range(count):
    off = (i * step) % (disk - size + 1)
    if depth == 1:
        print(f"{op} {off} {size}")
    else:
        print(f"{aop} {off} {size}")
        if i % depth == depth - 1:
            print("aio_flush")
print("aio_flush")
PY
    }
    ebench() { # ebench <tool> <luks|plain> <args...>: whole-process seconds
        local tool=$1 kind=$2 t0; shift 2
        local script="$dir/qemu-io-script.txt"
        [ "$tool" = qemu ] && qio_script "$@" > "$script"
        t0=$(now)
        if [ "$tool" = qemu ] && [ "$kind" = luks ]; then
            qemu-io --object "secret,id=s0,data=$pass" --image-opts \
                "driver=qcow2,file.filename=$eimg,encrypt.key-secret=s0" < "$script" > /dev/null
        elif [ "$tool" = qemu ]; then
            qemu-io -f qcow2 "$pimg" < "$script" > /dev/null
        elif [ "$tool" = qemu-bench ]; then
            qemu-img bench -f qcow2 "$@" -t writeback "$pimg" > /dev/null
        elif [ "$kind" = luks ]; then
            "$cowdisk" bench --object "secret,id=s0,data=$pass" "$@" -t writeback "$eimg" > /dev/null
        else
            "$cowdisk" bench "$@" -t writeback "$pimg" > /dev/null
        fi
        since "$t0"
    }
    cat "$eimg" "$pimg" > /dev/null
    for ((i = 0; i < runs; i++)); do
        for c in "${ecases[@]}"; do
            IFS='|' read -r name args <<< "$c"
            for key in "qemu luks" "cowdisk luks" "qemu plain" "cowdisk plain" "qemu-bench plain"; do
                read -r tool kind <<< "$key"
                # shellcheck disable=SC2086
                t=$(ebench "$tool" "$kind" $args)
                echo "   $name $args: $key run $((i + 1)): $t s"
                times["$key $name $args"]+="$t "
            done
        done
    done
    for c in "${ecases[@]}"; do
        IFS='|' read -r name args <<< "$c"
        cl=$(med "cowdisk luks $name $args")
        ql=$(med "qemu luks $name $args")
        cp=$(med "cowdisk plain $name $args")
        qp=$(med "qemu plain $name $args")
        qb=$(med "qemu-bench plain $name $args")
        # QEMU's engine on LUKS, estimated: qemu-img bench of the plain image plus what
        # encryption added to the same qemu-io script.
        qe=$(awk -v b="$qb" -v l="$ql" -v p="$qp" 'BEGIN { printf "%.3f", b + l - p }')
        r=$(ratio "$cl" "$qe")
        enc_rows+=("| $name | \`$args\` | $cl | $ql | $qp | $qb | $qe | $r | ≤ 0.7 | $(met "$r" 0.7) | $(ratio "$cl" "$cp") | $(ratio "$ql" "$qp") |")
    done
fi

echo "bench: measuring took $(since "$start_all") s"

{
    echo "# Benchmarks"
    echo
    echo "Generated by \`make bench\` (scripts/bench.sh) on $(date -u '+%Y-%m-%d %H:%M UTC'), commit"
    echo "\`$(git -C "$top" rev-parse --short HEAD 2>/dev/null || echo unknown)\` (with uncommitted changes if any),"
    echo "sections: $only. Every figure is the median of $runs runs; the tools alternate within"
    echo "each run. Ratio = cowdisk / QEMU (or as stated): below 1.0 cowdisk is faster."
    echo
    echo "Machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo),"
    echo "$(free -g | awk '/Mem:/ {print $2}') GiB RAM, kernel $(uname -r), scratch file system"
    echo "$(df -T "$dir" | awk 'NR==2 {print $2}'); $(qemu-img --version | head -1)."
    if section bench; then
        echo
        echo "## qemu-img bench workloads"
        echo
        echo "Each workload runs \`qemu-img bench\` and \`cowdisk bench\` (same options, same meaning);"
        echo "the table shows median seconds as each tool reports them. Write workloads start from a"
        echo "fresh empty 8 GiB qcow2 image (64 KiB clusters) per run; read workloads use a 4 GiB image"
        echo "created with \`qemu-img create -o preallocation=full\` (workload 5: the 1 GiB of mixed"
        echo "data described below, converted by \`qemu-img convert -c\`, zlib, 64 KiB clusters)."
        echo "\`-d\` is QEMU's requests in flight and cowdisk's worker threads. Workloads 1–4 are"
        echo "issue 4's; 5 is beyond it."
        echo
        echo "| workload | options | cowdisk s | QEMU s | ratio | goal | met |"
        echo "|---|---|---|---|---|---|---|"
        printf '%s\n' "${rows[@]}"
        echo
        echo "Commands: \`qemu-img bench -f qcow2 OPTIONS IMAGE\` and \`cowdisk bench OPTIONS IMAGE\`."
    fi
    if section compress; then
        echo
        echo "## Compressed writes (issue 5)"
        echo
        echo "1 GiB of mixed data (\`scripts/mixed-data.py\`: 1 MiB blocks in turn all zeros, text of"
        echo "words and numbers, random bytes) converted into a new zlib-compressed qcow2 image with"
        echo "64 KiB clusters: \`qemu-img convert -c -O qcow2 -f raw -t MODE RAW OUT\` against"
        echo "\`cowdisk bench-compress OPTIONS RAW OUT\` (creates the image, reads the raw file in 32 MiB"
        echo "steps, hands each run of non-zero clusters to \`Image::write_compressed\` — the engine of"
        echo "\`cowdisk_pwrite_compressed\` — leaves all-zero clusters unallocated as qemu-img does, closes)."
        echo "Both are timed as whole processes, the raw file in the page cache; \`-t none\` is O_DIRECT"
        echo "on the image; \`--no-cache\` turns the compressed-write cache off (default 4 MiB). Every"
        echo "cowdisk configuration's image was checked once (not timed) with \`qemu-img compare\` against"
        echo "the raw file and \`qemu-img check\`. QEMU is compared in the same cache mode."
        echo
        echo "| cowdisk options | cowdisk s | QEMU s | ratio | goal | met |"
        echo "|---|---|---|---|---|---|"
        printf '%s\n' "${compress_rows[@]}"
        echo
        echo "Compressed writes under O_DIRECT with the cache / the same writes cached (cowdisk):"
        echo "**$compress_direct** (goal ≤ 1.5: $(met "$compress_direct" 1.5))."
    fi
    if section vmstate; then
        echo
        echo "## VM state (issue 6)"
        echo
        echo "2 GiB of VM state saved in realistic pieces (60 % of 1–100 bytes, 38 % of 4096 + 8,"
        echo "1.9 % up to 256 KiB, 0.1 % up to 4 MiB; 340 131 pieces) into a fresh 1 GiB qcow2 image:"
        echo "\`cowdisk bench-vmstate -t MODE [--unbuffered] IMAGE\` times the saves, finalize and a"
        echo "flush (piece sizes and data are prepared before the clock starts). *pool* is"
        echo "\`Image::save_vmstate\` (1 MiB buffer, up to 8 writer threads); *unbuffered* is"
        echo "\`Image::save_vmstate_unbuffered\`, every piece straight through the cluster path as"
        echo "QEMU does. *dd* is the disk's own speed:"
        echo "\`dd if=/dev/zero of=FILE bs=1M count=2048 conv=fsync [oflag=direct]\`, seconds as dd reports."
        echo
        echo "| cache mode | pool s | unbuffered s | dd s | pool / unbuffered | pool / dd |"
        echo "|---|---|---|---|---|---|"
        printf '%s\n' "${vm_rows[@]}"
        echo
        echo "| goal (O_DIRECT) | ratio | goal | met |"
        echo "|---|---|---|---|"
        echo "| pool at least 4× faster than unbuffered | $vm_speedup | ≤ 0.25 | $(met "$vm_speedup" 0.25) |"
        echo "| pool within 1.2× of the raw disk (dd) | $vm_vs_dd | ≤ 1.2 | $(met "$vm_vs_dd" 1.2) |"
    fi
    if section integrity; then
        echo
        echo "## Integrity (issue 11)"
        echo
        echo "What the overlap checks (every host write checked against the metadata index, and"
        echo "tables checked before they change) cost: \`cowdisk bench\` with the checks on (the"
        echo "default) and off (\`--no-overlap-check\`, QEMU's overlap-check=none), alternating,"
        echo "same images as above. Ratio = on / off."
        echo
        echo "| workload | options | on s | off s | ratio | goal | met |"
        echo "|---|---|---|---|---|---|---|"
        printf '%s\n' "${overlap_rows[@]}"
        echo
        echo "\`map --output=json\` of an empty 1 PiB image (64 KiB clusters): cowdisk **$map_cowdisk s**"
        echo "(median of $runs, whole process; goal < 0.1 s: $(met "$map_cowdisk" 0.1)); \`qemu-img map\`"
        echo "of the same image took $map_qemu s (one run). Block status skips runs of empty L1"
        echo "entries, so its time follows what is mapped, not the virtual size."
    fi
    if section bitmaps; then
        echo
        echo "## Persistent dirty bitmaps (issue 16)"
        echo
        echo "What keeping bitmaps costs: \`cowdisk bench\` on a fresh 8 GiB image with no bitmap, 1 and 8"
        echo "(64 KiB granularity, added with \`qemu-img bitmap --add\`), alternating, $runs runs, medians."
        echo "Every write sets the bits of every enabled bitmap. \"requests\" is the time \`cowdisk bench\`"
        echo "reports (as \`qemu-img bench\` does: the requests and a final flush); \"process\" is the"
        echo "whole command, so it adds what does not grow with the work — marking the bitmaps in use at"
        echo "open (three syncs, QEMU's protocol) and storing them at close."
        echo
        echo "| workload | options | 0 bitmaps s | 1 bitmap s | 8 bitmaps s | 1/0 | 8/0 | goal (8/0) | met | process, 0 s | process, 8 s | 8/0 |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
        printf '%s\n' "${bitmap_rows[@]}"
    fi
    if section convert; then
        echo
        echo "## Convert (issue 12)"
        echo
        echo "A 2 GiB qcow2 image (64 KiB clusters) whose first GiB holds the mixed data above written"
        echo "as data (zeros included, \`qemu-img convert -n -S 0\`) and whose second GiB is unallocated,"
        echo "converted by \`qemu-img convert ARGS SRC DST\` and \`cowdisk convert ARGS SRC DST\`"
        echo "(defaults: 8 workers, in-order writes, 4 KiB zero detection), each timed as a whole"
        echo "process from the page cache to a flushed target; tools alternate in every run. Raw to"
        echo "qcow2 converts the 1 GiB mixed raw file; the compressed source is the zlib image of"
        echo "workload 5. cowdisk's targets were checked once (not timed) with \`qemu-img compare\`."
        echo "Seconds: median (min–max)."
        echo
        echo "| case | cowdisk args | cowdisk s | qemu-img args: s | ratio | goal | met |"
        echo "|---|---|---|---|---|---|---|"
        printf '%s\n' "${convert_rows[@]}"
        echo
        echo "\`dd if=RAW of=OUT bs=2M conv=fsync\` of the same 1 GiB: $convert_dd s; cowdisk qcow2 → qcow2,"
        echo "flushed / dd = **$convert_vs_dd** (goal ≤ 1.5: $(met "$convert_vs_dd" 1.5))."
    fi
    if section encryption; then
        echo
        echo "## Encrypted images (issue 13)"
        echo
        echo "A 1 GiB qcow2 image (64 KiB clusters) fully written with random data by"
        echo "\`qemu-img convert\`, LUKS-encrypted with QEMU's default aes-256-xts-plain64, and the same"
        echo "data unencrypted. \`qemu-img bench\` cannot open encrypted images (it takes no"
        echo "\`--object\`), so QEMU runs the same requests as a \`qemu-io --object secret,… --image-opts\`"
        echo "script (\`read\`/\`write\` one at a time for \`-d 1\`; batches of 8 \`aio_read\`/\`aio_write\`"
        echo "and an \`aio_flush\` for \`-d 8\`) against \`cowdisk bench --object secret,… OPTIONS\`, both"
        echo "timed as whole processes, cached (images in the page cache, \`-t writeback\`). Writes"
        echo "rewrite allocated clusters in place. qemu-io spends time of its own on every command"
        echo "(parsing, reporting), so QEMU's engine on LUKS is *estimated* as \`qemu-img bench\` of the"
        echo "plain image plus what encryption added to the qemu-io script (LUKS − plain); the ratio"
        echo "is cowdisk / that estimate. The last two columns are each tool's encrypted / plain"
        echo "time (QEMU's: the qemu-io script on both images)."
        echo
        echo "| workload | options | cowdisk LUKS s | qemu-io LUKS s | qemu-io plain s | qemu-img bench plain s | QEMU LUKS est. s | ratio | goal | met | cowdisk enc/plain | QEMU enc/plain |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
        printf '%s\n' "${enc_rows[@]}"
    fi
    if section nbd; then
        BENCH_DIR=$dir BENCH_RUNS=$runs "$top/scripts/bench-nbd.sh"
    fi
} > "$out"
echo "bench: wrote $out"
