"""The ctypes declarations match include/cowdisk.h; library lookup; Error basics."""

from __future__ import annotations

import ctypes
import errno
import re
import shutil
import subprocess
import sys
import tomllib

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
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())
    assert cowdisk.version() == cargo["package"]["version"]


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
    release = REPO / "target" / "release" / "libcowdisk.so"
    debug = REPO / "target" / "debug" / "libcowdisk.so"
    if not (release.exists() or debug.exists()):
        pytest.skip("no build tree under target/ (CARGO_TARGET_DIR set?)")
    r = run_child(clean_env, PYTHON_DIR)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(release if release.exists() else debug)


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


def test_lookup_not_found_is_clear_import_error(clean_env, tmp_path):
    site = tmp_path / "a" / "b"
    copy_package(site / "cowdisk")
    r = run_child(clean_env, site)
    assert r.returncode != 0
    assert "ImportError" in r.stderr
    assert "cannot find libcowdisk.so" in r.stderr and "COWDISK_LIB" in r.stderr


def test_header_version_matches_library():
    text = HEADER.read_text()
    string = re.search(r'#define COWDISK_VERSION_STRING "([^"]+)"', text).group(1)
    assert string == _native.VERSION_STRING == cowdisk.version()
    parts = [int(re.search(rf"#define COWDISK_VERSION_{p} (\d+)", text).group(1))
             for p in ("MAJOR", "MINOR", "PATCH")]
    assert ".".join(map(str, parts)) == string
