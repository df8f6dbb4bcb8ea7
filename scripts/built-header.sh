#!/usr/bin/env bash
# Prints the path of the C header that cbindgen generated during the last
# `cargo build --release --message-format=json-render-diagnostics`, whose JSON
# messages are read from $1 (default build/cargo-build.json).
#
# Fails when the build did not run cowdisk's build script, or when cbindgen
# reported an error (build.rs then only warns and leaves an old header behind).
set -euo pipefail

json=${1:-build/cargo-build.json}
if [[ ! -s $json ]]; then
    echo "built-header: $json is missing; run 'make build' first" >&2
    exit 1
fi

out_dir=$(python3 - "$json" <<'PY'
import json, os, sys
found = None
with open(sys.argv[1]) as f:
    for line in f:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") != "build-script-executed":
            continue
        out = msg.get("out_dir") or ""
        if os.path.basename(os.path.dirname(out)).startswith("cowdisk-"):
            found = out
if not found:
    sys.exit("built-header: no build-script output for cowdisk in " + sys.argv[1])
print(found)
PY
)

output_file="$(dirname "$out_dir")/output"
if [[ -f $output_file ]] && grep -q 'cbindgen could not generate' "$output_file"; then
    echo "built-header: cbindgen failed to generate the header:" >&2
    grep 'cbindgen could not generate' "$output_file" | sed 's/^cargo:warning=/  /' >&2
    exit 1
fi
if [[ ! -f $out_dir/cowdisk.h ]]; then
    echo "built-header: $out_dir/cowdisk.h was not generated" >&2
    exit 1
fi
echo "$out_dir/cowdisk.h"
