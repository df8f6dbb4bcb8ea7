#!/usr/bin/env bash
# Installs what `make test` and `make demo` need and is missing, on Debian/Ubuntu:
# Go (golang-go), valgrind, qemu-img (qemu-utils), a C compiler, pytest (from PyPI),
# python3-venv, file and readelf (the wheel test), nbdkit with its plugin header and the
# NBD clients (libnbd-bin, nbdsh), libzstd-dev and binutils for the install test, and
# the rustfmt/clippy components. Quick and silent when everything is present.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

sudo=""
if [[ $(id -u) -ne 0 ]]; then
    if have sudo; then sudo="sudo"; else
        echo "deps: not root and no sudo; install missing tools by hand" >&2
    fi
fi

apt_updated=0
apt_install() {
    if ! have apt-get; then
        echo "deps: apt-get not found; please install: $*" >&2
        return 1
    fi
    if [[ $apt_updated -eq 0 ]]; then
        echo "deps: apt-get update"
        $sudo apt-get update -qq
        apt_updated=1
    fi
    echo "deps: apt-get install $*"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

packages=()
have cc || have gcc || packages+=(gcc libc6-dev)
have go || packages+=(golang-go)
have valgrind || packages+=(valgrind)
have qemu-img || packages+=(qemu-utils)
have python3 || packages+=(python3 python3-pip)
# `make test-pywheel`: a venv (Debian splits ensurepip out of python3), file and readelf.
if ! have python3 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    packages+=(python3-venv)
fi
have file || packages+=(file)
# The nbdkit plugin: the server, its plugin header, and the NBD clients of its tests.
have nbdkit || packages+=(nbdkit)
[[ -f /usr/include/nbdkit-plugin.h ]] || packages+=(nbdkit-plugin-dev)
have nbdinfo && have nbdcopy || packages+=(libnbd-bin)
have nbdsh || packages+=(python3-libnbd)
have pkg-config || packages+=(pkg-config)
# The install test links a program against the system libzstd next to libcowdisk.a.
[[ -f /usr/include/zstd.h ]] || packages+=(libzstd-dev)
have readelf && have strip && have objcopy || packages+=(binutils)
if [[ ${#packages[@]} -gt 0 ]]; then
    apt_install "${packages[@]}"
fi

if ! python3 -c 'import pytest' >/dev/null 2>&1; then
    echo "deps: installing pytest from PyPI"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        # No pip for this python: Debian's packaged pytest serves the system python.
        apt_install python3-pytest
    elif ! python3 -m pip install -q pytest; then
        # Debian's system python refuses pip installs without this flag (PEP 668).
        python3 -m pip install -q --break-system-packages pytest
    fi
    python3 -c 'import pytest' || { echo "deps: pytest still not importable" >&2; exit 1; }
fi

if have rustup; then
    cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
    cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi
