"""Failures surface as cowdisk.Error with the right errno, message and filename."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

import cowdisk
from conftest import MiB


def assert_error(exc_info, code, path=None):
    e = exc_info.value
    assert isinstance(e, cowdisk.Error) and isinstance(e, OSError)
    # ... and Python's own subclass for the errno, where there is one.
    assert isinstance(e, type(OSError(code, "")))
    assert e.errno == code, (e.errno, e.strerror)
    assert e.strerror and e.strerror != "unknown error"
    if path is not None:
        assert e.filename == str(path)
        assert str(path) in str(e)
    return e


def test_open_nonexistent(tmp_path):
    path = tmp_path / "missing.qcow2"
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.open(path)
    assert_error(exc, errno.ENOENT, path)
    assert not path.exists()


def test_open_not_qcow2(tmp_path):
    path = tmp_path / "text.img"
    path.write_bytes(b"this is plainly not a disk image\n" * 100)
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.open(path, readonly=True)
    e = assert_error(exc, errno.EINVAL, path)
    assert "qcow2" in e.strerror.lower()


def test_open_empty_file(tmp_path):
    path = tmp_path / "empty.img"
    path.write_bytes(b"")
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.open(path)
    assert exc.value.errno in (errno.EINVAL, errno.EIO)
    assert path.read_bytes() == b""


@pytest.mark.parametrize("keep", [50, 4])
def test_open_truncated_image(new_image, keep):
    path = new_image(1 * MiB)
    os.truncate(path, keep)
    before = path.read_bytes()
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.open(path)
    e = exc.value
    assert e.errno in (errno.EINVAL, errno.EIO), (e.errno, e.strerror)
    assert e.filename == str(path) and e.strerror
    assert path.read_bytes() == before  # a failed open changes nothing on disk


def test_open_directory(tmp_path):
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.open(tmp_path)
    assert exc.value.errno in (errno.EISDIR, errno.EINVAL)


def test_create_over_existing_path(new_image, tmp_path):
    path = new_image(1 * MiB)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.create(path, 2 * MiB)
    assert_error(exc, errno.EEXIST, path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    with cowdisk.open(path) as img:
        assert img.size == 1 * MiB

    other = tmp_path / "data.bin"
    other.write_bytes(b"precious")
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.create(other, MiB)
    assert exc.value.errno == errno.EEXIST
    assert other.read_bytes() == b"precious"


def test_create_in_missing_directory(tmp_path):
    path = tmp_path / "no" / "such" / "dir.qcow2"
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.create(path, MiB)
    assert_error(exc, errno.ENOENT, path)


@pytest.mark.parametrize(
    "opts",
    [
        dict(version=1),
        dict(version=4),
        dict(cluster_size=1000),
        dict(cluster_size=256),
        dict(cluster_size=4 * MiB),
        dict(refcount_bits=3),
        dict(refcount_bits=128),
        dict(version=2, lazy_refcounts=True),
        dict(cluster_size=-1),
        dict(refcount_bits=2**32),
    ],
)
def test_create_bad_options(tmp_path, opts):
    path = tmp_path / "bad.qcow2"
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.create(path, MiB, **opts)
    assert_error(exc, errno.EINVAL, path)
    assert not path.exists(), "a failed create left a file behind"


def test_create_bad_python_arguments(tmp_path):
    path = tmp_path / "bad.qcow2"
    with pytest.raises(ValueError, match="compression_type"):
        cowdisk.create(path, MiB, compression_type="lz4")
    with pytest.raises(TypeError):
        cowdisk.create(path, 1.5)
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.create(path, -1)
    assert exc.value.errno == errno.EINVAL
    assert not path.exists()


def test_read_only_rejects_writes(new_image):
    path = new_image(1 * MiB)
    with cowdisk.open(path) as img:
        img.pwrite(b"original", 500)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with cowdisk.open(path, readonly=True) as img:
        with pytest.raises(cowdisk.Error) as exc:
            img.pwrite(b"changed!", 500)
        assert_error(exc, errno.EROFS, path)
        with pytest.raises(cowdisk.Error) as exc:
            img.pwrite(memoryview(bytearray(70_000)), 0)
        assert exc.value.errno == errno.EROFS
        assert img.pread(8, 500) == b"original"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize(
    "length,offset",
    [(1, MiB), (2, MiB - 1), (MiB + 1, 0), (10, 2**63), (1, 2**64 - 1)],
)
def test_out_of_range_io(new_image, length, offset):
    path = new_image(1 * MiB)
    with cowdisk.open(path) as img:
        img.pwrite(b"\x5a" * 16, MiB - 16)
        with pytest.raises(cowdisk.Error) as exc:
            img.pread(length, offset)
        assert_error(exc, errno.EINVAL, path)
        with pytest.raises(cowdisk.Error) as exc:
            img.pwrite(b"\xff" * length, offset)
        assert_error(exc, errno.EINVAL, path)
        with pytest.raises(cowdisk.Error) as exc:
            img.readinto(bytearray(length), offset)
        assert exc.value.errno == errno.EINVAL
        # The failed write left the old contents readable.
        assert img.pread(16, MiB - 16) == b"\x5a" * 16


def test_offsets_outside_uint64(new_image):
    path = new_image(1 * MiB)
    with cowdisk.open(path) as img:
        for offset in (-1, 2**64):
            with pytest.raises(cowdisk.Error) as exc:
                img.pread(1, offset)
            assert exc.value.errno == errno.EINVAL
            with pytest.raises(cowdisk.Error) as exc:
                img.pwrite(b"x", offset)
            assert exc.value.errno == errno.EINVAL
        with pytest.raises(ValueError):
            img.pread(-1, 0)
        with pytest.raises(TypeError):
            img.pread(1, 0.5)


def test_error_messages_are_per_call(tmp_path):
    # Each Error carries the message of its own failure, not an earlier one.
    missing = tmp_path / "missing.qcow2"
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(cowdisk.Error) as a:
        cowdisk.open(missing)
    with pytest.raises(cowdisk.Error) as b:
        cowdisk.open(junk)
    assert a.value.errno == errno.ENOENT and b.value.errno == errno.EINVAL
    assert a.value.strerror != b.value.strerror


def test_encrypted_image_needs_its_passphrase(tmp_path, qemu_img):
    path = tmp_path / "luks.qcow2"
    r = qemu_img.run(
        "create", "--object", "secret,id=sec0,data=password", "-f", "qcow2",
        "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", path, "1M",
    )
    if r.returncode != 0:
        pytest.skip(f"qemu-img cannot create LUKS images here: {r.stderr.strip()}")
    before = path.read_bytes()
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.open(path, readonly=True)
    e = assert_error(exc, errno.ENOKEY, path)
    assert "luks" in e.strerror.lower() and "passphrase" in e.strerror.lower()
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.open(path, readonly=True, secret="wrong")
    e = assert_error(exc, errno.EKEYREJECTED, path)
    assert "wrong" not in e.strerror
    assert path.read_bytes() == before


def test_errors_are_the_builtin_oserror_subclasses(tmp_path, new_image):
    with pytest.raises(FileNotFoundError) as exc:
        cowdisk.open(tmp_path / "missing.qcow2")
    assert isinstance(exc.value, cowdisk.Error) and exc.value.errno == errno.ENOENT
    path = new_image()
    with pytest.raises(FileExistsError):
        cowdisk.create(path, MiB)
    with pytest.raises(IsADirectoryError):
        cowdisk.open(tmp_path)
    # Errors without a built-in subclass are plain cowdisk.Error.
    with open(tmp_path / "junk", "wb") as f:
        f.write(b"not qcow2" * 100)
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.open(tmp_path / "junk")
    assert type(exc.value) is cowdisk.Error and exc.value.errno == errno.EINVAL


def test_error_classes_for_permission_errnos():
    from cowdisk._errors import error_class

    for code in (errno.EACCES, errno.EPERM):
        cls = error_class(code)
        assert issubclass(cls, cowdisk.Error) and issubclass(cls, PermissionError)
    assert issubclass(error_class(errno.ENOENT), FileNotFoundError)
    assert issubclass(error_class(errno.EEXIST), FileExistsError)
    assert error_class(errno.EINVAL) is cowdisk.Error


@pytest.mark.skipif(os.geteuid() == 0, reason="root is not refused access to files")
def test_permission_denied_is_permission_error(new_image):
    path = new_image()
    os.chmod(path, 0o400)
    try:
        with pytest.raises(PermissionError) as exc:
            cowdisk.open(path)  # read-write
        assert isinstance(exc.value, cowdisk.Error) and exc.value.errno == errno.EACCES
        assert exc.value.filename == str(path)
        with cowdisk.open(path, readonly=True):
            pass
    finally:
        os.chmod(path, 0o600)
