"""Loading ``libcowdisk`` and declaring its C ABI (``include/cowdisk.h``) with ctypes.

Everything here mirrors the header exactly; nothing here is public API. To bind a new C
function, add one line to ``_FUNCTIONS`` (and, if it takes a new struct, mirror the struct
here with ``struct_size`` first).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import (
    POINTER,
    Structure,
    c_char,
    c_char_p,
    c_int,
    c_int64,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path

LIBRARY_NAME = "libcowdisk.so"
# The installed library's soname (major version 0), found by the dynamic linker.
SYSTEM_LIBRARY_NAME = "libcowdisk.so.0"
ENV_VAR = "COWDISK_LIB"

# --- constants (COWDISK_* in the header) ------------------------------------------------

# The header this binding follows (the loaded library's own is cowdisk.version()).
VERSION_MAJOR = 0
VERSION_MINOR = 1
VERSION_PATCH = 0
VERSION_STRING = "0.1.0"

OPEN_READONLY = 1
OPEN_DIRECT = 2
OPEN_NO_BACKING = 4
OPEN_DISCARD_UNMAP = 8
OPEN_NO_COMPRESSED_CACHE = 16
OPEN_FORCE_SHARE = 32
OPEN_NO_LOCK = 64
OPEN_CHECK = 128
OPEN_METADATA_ONLY = 256
OPEN_DROP_BITMAPS = 512
ENCRYPT_NONE = 0
ENCRYPT_AES = 1
ENCRYPT_LUKS = 2
CHECK_REPAIR_LEAKS = 1
CHECK_REPAIR_ALL = 2

CREATE_LAZY_REFCOUNTS = 1
CREATE_NO_BACKING_CHECK = 2

INFO_READONLY = 1
INFO_LAZY_REFCOUNTS = 2
INFO_DIRTY = 4
INFO_CORRUPT = 8

ZEROES_MAY_UNMAP = 1

RESIZE_FORCE = 1

EXTENT_DATA = 1
EXTENT_ZERO = 2
EXTENT_PRESENT = 4
EXTENT_COMPRESSED = 8
EXTENT_OFFSET_VALID = 16
EXTENT_DIRTY = 32

BITMAP_ENABLED = 1
BITMAP_INCONSISTENT = 2
BITMAP_ADD_DISABLED = 1

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

CONVERT_COMPRESSED = 1
CONVERT_OUT_OF_ORDER = 2
CONVERT_EXISTING_TARGET = 4
CONVERT_TARGET_IS_ZERO = 8
CONVERT_SOURCE_RAW = 16
CONVERT_TARGET_RAW = 32
CONVERT_SOURCE_DIRECT = 64
CONVERT_TARGET_DIRECT = 128
CONVERT_FORCE_SHARE = 256
CONVERT_NO_SPARSE = 512
CONVERT_SOURCE_QCOW2 = 1024
CONVERT_TARGET_NO_FLUSH = 2048
CONVERT_BITMAPS = 4096
CONVERT_SKIP_BROKEN_BITMAPS = 8192

COMPARE_STRICT = 1
COMPARE_FIRST_RAW = 2
COMPARE_SECOND_RAW = 4
COMPARE_FORCE_SHARE = 8

COMMIT_KEEP = 1

REBASE_UNSAFE = 1


# --- structs ------------------------------------------------------------------------------


class CreateOpts(Structure):
    """``struct cowdisk_create_opts``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("version", c_uint32),
        ("cluster_size", c_uint32),
        ("refcount_bits", c_uint32),
        ("flags", c_uint32),
        ("compression_type", c_uint32),
        ("backing_file", c_char_p),
        ("backing_format", c_char_p),
        ("secret", c_void_p),
        ("secret_len", c_size_t),
        ("encrypt_format", c_uint32),
        ("iter_time_ms", c_uint32),
        ("cipher_alg", c_char_p),
        ("cipher_mode", c_char_p),
        ("ivgen_alg", c_char_p),
        ("ivgen_hash_alg", c_char_p),
        ("hash_alg", c_char_p),
    ]


class OpenOpts(Structure):
    """``struct cowdisk_open_opts``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("flags", c_uint32),
        ("l2_cache_size", c_uint64),
        ("max_backing_depth", c_uint32),
        ("reserved", c_uint32),
        ("compressed_cache_size", c_uint64),
        ("secret", c_void_p),
        ("secret_len", c_size_t),
        ("snapshot", c_char_p),
    ]


class Info(Structure):
    """``struct cowdisk_info``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("version", c_uint32),
        ("virtual_size", c_uint64),
        ("cluster_size", c_uint32),
        ("refcount_bits", c_uint32),
        ("flags", c_uint32),
        ("compression_type", c_uint32),
        ("nb_snapshots", c_uint32),
        ("backing_depth", c_uint32),
        ("host_size", c_uint64),
        ("backing_file", c_char * 1024),
        ("backing_format", c_char * 32),
        ("encrypt_format", c_uint32),
        ("reserved", c_uint32),
    ]


class CheckResult(Structure):
    """``struct cowdisk_check_result``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("reserved", c_uint32),
        ("corruptions", c_uint64),
        ("leaks", c_uint64),
        ("check_errors", c_uint64),
        ("corruptions_fixed", c_uint64),
        ("leaks_fixed", c_uint64),
        ("image_end_offset", c_uint64),
        ("total_clusters", c_uint64),
        ("allocated_clusters", c_uint64),
        ("fragmented_clusters", c_uint64),
        ("compressed_clusters", c_uint64),
    ]


class AmendOpts(Structure):
    """``struct cowdisk_amend_opts``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("version", c_uint32),
        ("lazy_refcounts", c_uint32),
        ("refcount_bits", c_uint32),
    ]


class Extent(Structure):
    """``struct cowdisk_extent`` (an output array element; no ``struct_size``)."""

    _fields_ = [
        ("start", c_uint64),
        ("length", c_uint64),
        ("offset", c_uint64),
        ("flags", c_uint32),
        ("depth", c_uint32),
    ]


class SnapshotOpts(Structure):
    """``struct cowdisk_snapshot_opts``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("flags", c_uint32),
        ("vm_state_size", c_uint64),
        ("vm_clock_nsec", c_uint64),
        ("icount", c_int64),
    ]


class SnapshotInfo(Structure):
    """``struct cowdisk_snapshot_info`` (an output array element; ``struct_size`` set in
    the first one)."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("date_sec", c_uint32),
        ("date_nsec", c_uint32),
        ("reserved", c_uint32),
        ("vm_state_size", c_uint64),
        ("vm_clock_nsec", c_uint64),
        ("disk_size", c_uint64),
        ("icount", c_int64),
        ("id", c_char * 128),
        ("name", c_char * 1024),
    ]


class BitmapInfo(Structure):
    """``struct cowdisk_bitmap_info`` (an output array element; ``struct_size`` set in
    the first one)."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("flags", c_uint32),
        ("granularity", c_uint64),
        ("dirty_bytes", c_uint64),
        ("name", c_char * 1024),
    ]


# ``cowdisk_progress_fn``: int (*)(void *opaque, uint64_t done, uint64_t total).
PROGRESS_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_uint64, c_uint64)


class ConvertOpts(Structure):
    """``struct cowdisk_convert_opts``."""

    _fields_ = [
        ("struct_size", c_uint32),
        ("flags", c_uint32),
        ("workers", c_uint32),
        ("reserved", c_uint32),
        ("min_sparse", c_uint64),
        ("create", POINTER(CreateOpts)),
        ("snapshot", c_char_p),
        ("backing_file", c_char_p),
        ("backing_format", c_char_p),
        ("progress", PROGRESS_FN),
        ("opaque", c_void_p),
        ("secret", c_void_p),
        ("secret_len", c_size_t),
    ]


def new_struct(cls):
    """Returns a zeroed instance of an option/info struct with ``struct_size`` set."""
    s = cls()
    s.struct_size = ctypes.sizeof(cls)
    return s


# An opaque ``cowdisk *`` handle travels as a void pointer.
Handle = c_void_p

# name -> (restype, argtypes). Every function of include/cowdisk.h appears here.
_FUNCTIONS = {
    "cowdisk_create": (c_int, [c_char_p, c_uint64, POINTER(CreateOpts)]),
    "cowdisk_open": (c_int, [c_char_p, POINTER(OpenOpts), POINTER(Handle)]),
    "cowdisk_close": (c_int, [Handle]),
    "cowdisk_pread": (c_int, [Handle, c_void_p, c_size_t, c_uint64]),
    "cowdisk_pwrite": (c_int, [Handle, c_void_p, c_size_t, c_uint64]),
    "cowdisk_pwrite_compressed": (c_int, [Handle, c_void_p, c_size_t, c_uint64]),
    "cowdisk_flush": (c_int, [Handle]),
    "cowdisk_check": (c_int, [Handle, c_uint32, POINTER(CheckResult)]),
    "cowdisk_amend": (c_int, [Handle, POINTER(AmendOpts)]),
    "cowdisk_get_info": (c_int, [Handle, POINTER(Info)]),
    "cowdisk_write_zeroes": (c_int, [Handle, c_uint64, c_uint64, c_uint32]),
    "cowdisk_discard": (c_int, [Handle, c_uint64, c_uint64]),
    "cowdisk_resize": (c_int, [Handle, c_uint64]),
    "cowdisk_resize_ex": (c_int, [Handle, c_uint64, c_uint32]),
    "cowdisk_block_status": (
        c_int,
        [Handle, c_uint64, c_uint64, POINTER(Extent), c_size_t, POINTER(c_size_t)],
    ),
    "cowdisk_snapshot_create": (c_int, [Handle, c_char_p, POINTER(SnapshotOpts)]),
    "cowdisk_snapshot_goto": (c_int, [Handle, c_char_p]),
    "cowdisk_snapshot_delete": (c_int, [Handle, c_char_p]),
    "cowdisk_snapshot_list": (
        c_int,
        [Handle, POINTER(SnapshotInfo), c_size_t, POINTER(c_size_t)],
    ),
    "cowdisk_bitmap_list": (
        c_int,
        [Handle, POINTER(BitmapInfo), c_size_t, POINTER(c_size_t)],
    ),
    "cowdisk_bitmap_add": (c_int, [Handle, c_char_p, c_uint64, c_uint32]),
    "cowdisk_bitmap_remove": (c_int, [Handle, c_char_p]),
    "cowdisk_bitmap_clear": (c_int, [Handle, c_char_p]),
    "cowdisk_bitmap_enable": (c_int, [Handle, c_char_p, c_int]),
    "cowdisk_bitmap_merge": (c_int, [Handle, c_char_p, Handle, c_char_p]),
    "cowdisk_bitmap_extents": (
        c_int,
        [Handle, c_char_p, c_uint64, c_uint64, POINTER(Extent), c_size_t, POINTER(c_size_t)],
    ),
    "cowdisk_save_vmstate": (c_int, [Handle, c_void_p, c_size_t, c_uint64]),
    "cowdisk_load_vmstate": (c_int, [Handle, c_void_p, c_size_t, c_uint64]),
    "cowdisk_finalize_vmstate": (c_int, [Handle]),
    "cowdisk_convert": (c_int, [c_char_p, c_char_p, POINTER(ConvertOpts)]),
    "cowdisk_compare": (c_int, [c_char_p, c_char_p, c_uint32, POINTER(c_uint64)]),
    "cowdisk_commit": (c_int, [c_char_p, c_char_p, c_uint32, PROGRESS_FN, c_void_p]),
    "cowdisk_rebase": (
        c_int,
        [c_char_p, c_char_p, c_char_p, c_uint32, PROGRESS_FN, c_void_p],
    ),
    "cowdisk_last_error": (c_char_p, []),
    "cowdisk_strerror": (c_char_p, [c_int]),
    "cowdisk_version": (c_char_p, []),
}


# --- finding and loading the library ------------------------------------------------------


def candidate_paths() -> list[Path]:
    """The library files searched for, in order (``COWDISK_LIB`` and the system library
    excluded): the package's own copy, then the repository's build tree when this package
    is the one of a cowdisk checkout (``build/lib``, where ``make`` puts the shipped
    library, then ``target/release`` and ``target/debug``)."""
    package_dir = Path(__file__).resolve().parent
    paths = [package_dir / LIBRARY_NAME]
    repo = package_dir.parents[2] if len(package_dir.parents) > 2 else None
    if repo is not None and (repo / "Cargo.toml").is_file() and (
        package_dir == repo / "bindings" / "python" / "cowdisk"
    ):
        paths += [
            repo / "build" / "lib" / LIBRARY_NAME,
            repo / "target" / "release" / LIBRARY_NAME,
            repo / "target" / "debug" / LIBRARY_NAME,
        ]
    return paths


def _loaded_path(name: str) -> str:
    """The file the dynamic linker loaded for ``name`` (from /proc/self/maps), else
    ``name`` itself."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(None, 5)
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith(
                    LIBRARY_NAME
                ):
                    return fields[5].strip()
    except OSError:
        pass
    return name


def _load_cdll(path) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(os.fspath(path))
    except OSError as e:
        raise ImportError(f"cowdisk: cannot load {path}: {e}", path=os.fspath(path)) from e


_HOW_TO_FIX = (
    "Install the binding with its library (`pip install bindings/python` in the cowdisk "
    "repository), install the library system-wide (`make install`, then `ldconfig` or "
    "LD_LIBRARY_PATH), build it in the repository (`make` or `cargo build --release`), or "
    f"set {ENV_VAR} to the path of libcowdisk.so."
)


def find_and_load() -> tuple[ctypes.CDLL, str]:
    """Loads the library: ``$COWDISK_LIB`` if set (and only it), else the first of
    :func:`candidate_paths` that exists, else the system's ``libcowdisk.so.0`` (found by
    the dynamic linker: ``LD_LIBRARY_PATH``, the ldconfig cache), else what
    ``ctypes.util.find_library("cowdisk")`` finds. Returns the library and its path."""
    env = os.environ.get(ENV_VAR)
    if env:
        if not os.path.exists(env):
            raise ImportError(
                f"cowdisk: {ENV_VAR}={env!r} does not exist; point it at libcowdisk.so "
                f"or unset it to search the default locations",
                path=env,
            )
        return _load_cdll(env), env
    tried = []
    for p in candidate_paths():
        if p.is_file():
            return _load_cdll(p), str(p)
        tried.append(f"{p}: no such file")
    system_names = [SYSTEM_LIBRARY_NAME]
    found = ctypes.util.find_library("cowdisk")
    if found and found not in system_names:
        system_names.append(found)
    for name in system_names:
        try:
            lib = ctypes.CDLL(name)
        except OSError as e:
            tried.append(f"{name} (system library): {e}")
            continue
        return lib, _loaded_path(name)
    if not found:
        tried.append('ctypes.util.find_library("cowdisk"): nothing found')
    listing = "\n  ".join(tried)
    raise ImportError(
        f"cowdisk: cannot find libcowdisk.so. {_HOW_TO_FIX} Tried:\n  {listing}"
    )


def declare(lib: ctypes.CDLL, path: str) -> None:
    """Sets restype/argtypes on every C function; ImportError if a symbol is missing."""
    for name, (restype, argtypes) in _FUNCTIONS.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise ImportError(
                f"cowdisk: {path} does not export {name}; is it a stale build?", path=path
            ) from None
        fn.restype = restype
        fn.argtypes = argtypes


lib, lib_path = find_and_load()
declare(lib, lib_path)
