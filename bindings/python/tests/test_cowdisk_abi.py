"""The ctypes declarations match include/cowdisk.h; library lookup; Error basics."""

from __future__ import annotations

import ctypes
import errno
import re
import shutil
import subprocess
import sys

import pytest

import cowdisk
from cowdisk import _native
from conftest import PYTHON_DIR, REPO

HEADER = REPO / "include" / "cowdisk.h"


def header_functions() -> dict[str, int]:
    """Maps each function declared in the header to its number of parameters."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    found = {}
    for m in re.finditer(r"^[\w \*]*?\b(cowdisk_\w+)\(([^)]*)\);", text, flags=re.M):
        params = m.group(2).strip()
        found[m.group(1)] = 0 if params in ("", "void") else params.count(",") + 1
    return found


def test_every_header_function_is_declared():
    funcs = header_functions()
    assert len(funcs) >= 10, funcs  # the parser found the API
    assert set(funcs) == set(_native._FUNCTIONS)
    for name, nparams in funcs.items():
        fn = getattr(_native.lib, name)
        assert fn.argtypes is not None and len(fn.argtypes) == nparams, name
        assert fn.restype is not None, name


def test_header_constants_match():
    text = HEADER.read_text()
    defines = dict(
        (name, int(value)) for name, value in re.findall(r"#define COWDISK_(\w+) (\d+)", text)
    )
    assert defines, "no constants found in the header"
    for name, value in defines.items():
        assert getattr(_native, name) == value, name


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_struct_layout_matches_c_compiler(tmp_path):
    structs = {
        "cowdisk_create_opts": _native.CreateOpts,
        "cowdisk_open_opts": _native.OpenOpts,
        "cowdisk_info": _native.Info,
        "cowdisk_extent": _native.Extent,
        "cowdisk_snapshot_opts": _native.SnapshotOpts,
        "cowdisk_snapshot_info": _native.SnapshotInfo,
        "cowdisk_bitmap_info": _native.BitmapInfo,
        "cowdisk_convert_opts": _native.ConvertOpts,
    }
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "cowdisk.h"', "int main(void) {"]
    for cname, cls in structs.items():
        lines.append(f'printf("{cname} size %zu\\n", sizeof(struct {cname}));')
        for field, _ in cls._fields_:
            lines.append(
                f'printf("{cname} {field} %zu\\n", offsetof(struct {cname}, {field}));'
            )
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-I", str(REPO / "include"), "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    seen = 0
    for line in out.splitlines():
        cname, field, value = line.split()
        cls = structs[cname]
        expected = ctypes.sizeof(cls) if field == "size" else getattr(cls, field).offset
        assert int(value) == expected, line
        seen += 1
    assert seen == sum(len(c._fields_) + 1 for c in structs.values())


def test_version_matches_cargo_toml():
    # The first `version = ` of Cargo.toml is the [package] one (tomllib is 3.11+).
    cargo = re.search(r'^version = "([^"]+)"', (REPO / "Cargo.toml").read_text(), re.M)
    assert cowdisk.version() == cargo.group(1)


def test_strerror():
    assert cowdisk.strerror(errno.EINVAL) == cowdisk.strerror(-errno.EINVAL) == "invalid argument"
    assert cowdisk.strerror(errno.ENOENT) != cowdisk.strerror(errno.EINVAL)


def test_error_is_oserror():
    e = cowdisk.Error(errno.EROFS, "image is read-only", "/x.qcow2")
    assert isinstance(e, OSError) and type(e) is cowdisk.Error
    assert (e.errno, e.strerror, e.filename) == (errno.EROFS, "image is read-only", "/x.qcow2")
    assert "read-only" in str(e) and "/x.qcow2" in str(e)
    # OSError's errno -> subclass mapping must not turn it into another class.
    assert type(cowdisk.Error(errno.ENOENT, "gone")) is cowdisk.Error


# --- library lookup, checked in child interpreters ---------------------------------------

PROBE = "import cowdisk; print(cowdisk.library_path); print(cowdisk.version())"


def run_child(env, pythonpath, code=PROBE):
    env = dict(env, PYTHONPATH=str(pythonpath))
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/"
    )


def copy_package(dest):
    shutil.copytree(
        PYTHON_DIR / "cowdisk", dest, ignore=shutil.ignore_patterns("__pycache__", "*.so")
    )


def test_lookup_uses_build_tree_by_default(clean_env):
    tree = [
        REPO / "build" / "lib" / "libcowdisk.so",
        REPO / "target" / "release" / "libcowdisk.so",
        REPO / "target" / "debug" / "libcowdisk.so",
    ]
    existing = [p for p in tree if p.exists()]
    if not existing:
        pytest.skip("no build tree under build/lib or target/ (CARGO_TARGET_DIR set?)")
    if (PYTHON_DIR / "cowdisk" / "libcowdisk.so").exists():
        pytest.skip("bindings/python/cowdisk/libcowdisk.so exists and comes first")
    r = run_child(clean_env, PYTHON_DIR)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(existing[0])


def test_lookup_env_var_wins(clean_env, tmp_path):
    lib = tmp_path / "custom" / "libcowdisk.so"
    lib.parent.mkdir()
    shutil.copy(cowdisk.library_path, lib)
    r = run_child(dict(clean_env, COWDISK_LIB=str(lib)), PYTHON_DIR)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(lib)


def test_lookup_env_var_missing_file_is_import_error(clean_env, tmp_path):
    missing = tmp_path / "nope" / "libcowdisk.so"
    r = run_child(dict(clean_env, COWDISK_LIB=str(missing)), PYTHON_DIR)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "COWDISK_LIB" in r.stderr and str(missing) in r.stderr


def test_lookup_env_var_not_a_library_is_import_error(clean_env, tmp_path):
    bogus = tmp_path / "libcowdisk.so"
    bogus.write_text("not an ELF file")
    r = run_child(dict(clean_env, COWDISK_LIB=str(bogus)), PYTHON_DIR)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "cannot load" in r.stderr


def test_lookup_next_to_package(clean_env, tmp_path):
    site = tmp_path / "a" / "b"
    copy_package(site / "cowdisk")
    shutil.copy(cowdisk.library_path, site / "cowdisk" / "libcowdisk.so")
    r = run_child(clean_env, site)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(site / "cowdisk" / "libcowdisk.so")


def system_library_installed(env) -> bool:
    """Whether the dynamic linker finds a libcowdisk.so.0 in ``env`` (then the system
    library is the last resort of the lookup, and a copied package does load)."""
    probe = "import ctypes, ctypes.util; ctypes.CDLL('libcowdisk.so.0')"
    ok = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True)
    return ok.returncode == 0 or bool(ctypes.util.find_library("cowdisk"))


def test_lookup_not_found_is_clear_import_error(clean_env, tmp_path):
    if system_library_installed(clean_env):
        pytest.skip("a system libcowdisk.so.0 is installed")
    site = tmp_path / "a" / "b"
    copy_package(site / "cowdisk")
    r = run_child(clean_env, site)
    assert r.returncode != 0
    assert "ImportError" in r.stderr
    assert "cannot find libcowdisk.so" in r.stderr and "COWDISK_LIB" in r.stderr
    # Everything tried is listed, and how to fix it.
    assert str(site / "cowdisk" / "libcowdisk.so") in r.stderr
    assert "libcowdisk.so.0 (system library)" in r.stderr
    assert "pip install" in r.stderr and "make install" in r.stderr


def test_lookup_system_library_through_ld_library_path(clean_env, tmp_path):
    """Without a package copy or build tree, the dynamic linker's libcowdisk.so.0."""
    libdir = tmp_path / "lib"
    libdir.mkdir()
    shutil.copy(cowdisk.library_path, libdir / "libcowdisk.so.0")
    site = tmp_path / "a" / "b"
    copy_package(site / "cowdisk")
    env = dict(clean_env, LD_LIBRARY_PATH=str(libdir))
    r = run_child(env, site)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(libdir / "libcowdisk.so.0"), cowdisk.version()]


def test_lookup_package_copy_comes_before_system_library(clean_env, tmp_path):
    libdir = tmp_path / "lib"
    libdir.mkdir()
    shutil.copy(cowdisk.library_path, libdir / "libcowdisk.so.0")
    site = tmp_path / "a" / "b"
    copy_package(site / "cowdisk")
    shutil.copy(cowdisk.library_path, site / "cowdisk" / "libcowdisk.so")
    r = run_child(dict(clean_env, LD_LIBRARY_PATH=str(libdir)), site)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(site / "cowdisk" / "libcowdisk.so")


def test_header_version_matches_library():
    text = HEADER.read_text()
    string = re.search(r'#define COWDISK_VERSION_STRING "([^"]+)"', text).group(1)
    assert string == _native.VERSION_STRING == cowdisk.version()
    parts = [int(re.search(rf"#define COWDISK_VERSION_{p} (\d+)", text).group(1))
             for p in ("MAJOR", "MINOR", "PATCH")]
    assert ".".join(map(str, parts)) == string
