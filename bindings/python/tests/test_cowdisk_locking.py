"""Image locking: a second writer is refused with EBUSY (here and in qemu-io), readers
get in with force_share, and locking=False takes no locks."""

from __future__ import annotations

import errno
import shutil
import subprocess

import pytest

import cowdisk


def test_second_writer_is_refused(new_image):
    path = new_image()
    with cowdisk.open(path) as img:
        img.pwrite(b"x" * 512, 0)
        with pytest.raises(cowdisk.Error) as exc:
            cowdisk.open(path)
        assert exc.value.errno == errno.EBUSY
        assert 'Failed to get "write" lock' in str(exc.value)
        with pytest.raises(cowdisk.Error) as exc:
            cowdisk.open(path, readonly=True)
        assert exc.value.errno == errno.EBUSY
        with cowdisk.open(path, readonly=True, force_share=True) as reader:
            assert reader.size == img.size
        with cowdisk.open(path, locking=False) as unlocked:
            assert unlocked.size == img.size
    with cowdisk.open(path) as again:
        assert again.pread(1, 0) == b"x"


def test_force_share_needs_readonly(new_image):
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.open(new_image(), force_share=True)
    assert exc.value.errno == errno.EINVAL


def test_qemu_io_is_kept_out(new_image):
    qemu_io = shutil.which("qemu-io")
    if qemu_io is None:
        pytest.skip("qemu-io is not installed")
    path = new_image()
    with cowdisk.open(path):
        r = subprocess.run(
            [qemu_io, "-f", "qcow2", "-c", "write 0 512", str(path)],
            capture_output=True,
            text=True,
        )
        assert r.returncode != 0
        assert 'Failed to get "write" lock' in r.stderr


def test_check_and_repair(new_image):
    path = new_image()
    with cowdisk.open(path) as img:
        img.pwrite(b"x" * 4096, 0)
        r = img.check()
        assert r.clean and r.allocated_clusters == 1
        with pytest.raises(ValueError):
            img.check("everything")
        assert img.check("all").clean
    with cowdisk.open(path, readonly=True) as img:
        with pytest.raises(cowdisk.Error) as exc:
            img.check("leaks")
        assert exc.value.errno == errno.EROFS


def test_amend(new_image):
    path = new_image()
    with cowdisk.open(path) as img:
        img.pwrite(b"y" * 4096, 0)
        img.amend(refcount_bits=8)
        assert img.info.refcount_bits == 8
        with pytest.raises(cowdisk.Error) as exc:
            img.amend(version=2)
        assert exc.value.errno == errno.EINVAL
        img.amend(version=2, refcount_bits=16)
        assert img.info.version == 2
        assert img.pread(4096, 0) == b"y" * 4096
        assert img.check().clean
