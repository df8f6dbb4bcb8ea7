#!/usr/bin/env bash
# The body of `make demo`: creates images in a scratch folder through the C API
# (examples/demo.c) and the `cowdisk` CLI, then shows qemu-img accepting them.
# Expects `make demo` to have built target/release/ and $1/demo.
set -euo pipefail

dir=${1:-build/demo}
cli=target/release/cowdisk
demo=$dir/demo

bold=$'\033[1m'; dim=$'\033[2m'; reset=$'\033[0m'
if [[ ! -t 1 ]]; then bold=""; dim=""; reset=""; fi

heading() { printf '\n%s== %s ==%s\n' "$bold" "$*" "$reset"; }
# Prints a command (quoting arguments with spaces) and runs it.
run() {
    local shown="" arg
    for arg in "$@"; do
        if [[ $arg == *[[:space:]]* ]]; then shown+="'$arg' "; else shown+="$arg "; fi
    done
    printf '%s$ %s%s\n' "$dim" "${shown% }" "$reset"
    "$@"
}

for tool in qemu-img qemu-io; do
    command -v $tool >/dev/null || { echo "demo: $tool not found; run 'make deps'" >&2; exit 1; }
done
rm -f "$dir"/*.qcow2 "$dir"/*.txt

heading "1. The C API: examples/demo.c creates, writes and reads an image"
run "$demo" "$dir/c-api.qcow2"

heading "2. QEMU checks the image written through the C API"
run qemu-img check "$dir/c-api.qcow2"
run qemu-io -r -f qcow2 -c 'read -P 0xab 1048579 1M' "$dir/c-api.qcow2"

heading "3. The command-line tool"
img=$dir/cli.qcow2
run "$cli" create "$img" 1G
run "$cli" write -P 0x5a "$img" 65000 100000
run "$cli" read -P 0x5a "$img" 65000 100000
echo "cowdisk wrote this line through the CLI." > "$dir/hello.txt"
run "$cli" write --from "$dir/hello.txt" "$img" 5M "$(stat -c %s "$dir/hello.txt")"
run "$cli" read --to "$dir/hello-back.txt" "$img" 5M "$(stat -c %s "$dir/hello.txt")"
run cmp "$dir/hello.txt" "$dir/hello-back.txt"
echo "the file read back is identical"
run "$cli" info "$img"

heading "4. QEMU accepts the image written by the CLI"
run qemu-img check "$img"
run qemu-img info "$img"
run qemu-io -r -f qcow2 -c 'read -P 0x5a 65000 100000' "$img"

heading "5. QEMU writes, cowdisk reads"
run qemu-io -f qcow2 -c 'write -P 0x77 3M 8k' "$img"
run "$cli" read -P 0x77 "$img" 3M 8k

heading "Done"
echo "The demo images are in $dir/. Next: 'make test' runs every test."
