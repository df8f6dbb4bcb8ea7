"""Image.info and create options, cross-checked with `qemu-img info`; backing files."""

from __future__ import annotations

import dataclasses
import errno
import os
import random

import pytest

import cowdisk
from conftest import MiB


def test_info_defaults(new_image, qemu_img):
    path = new_image(5 * MiB)
    with cowdisk.open(path) as img:
        info = img.info
        assert isinstance(info, cowdisk.ImageInfo)
        assert info.version == 3
        assert info.virtual_size == img.size == 5 * MiB
        assert info.cluster_size == 65536
        assert info.refcount_bits == 16
        assert info.compression_type == "zlib"
        assert (info.read_only, info.lazy_refcounts, info.dirty, info.corrupt) == (
            False, False, False, False,
        )
        assert info.nb_snapshots == 0
        assert info.backing_depth == 0
        assert info.backing_file is None and info.backing_format is None
        assert info.host_size == os.path.getsize(path)
        with pytest.raises(dataclasses.FrozenInstanceError):
            info.version = 2
    q = qemu_img.info(path)
    assert q["format"] == "qcow2" and q["virtual-size"] == 5 * MiB
    assert q["cluster-size"] == 65536
    assert q["format-specific"]["data"]["compat"] == "1.1"
    qemu_img.assert_clean(path)


@pytest.mark.parametrize("version,compat", [(2, "0.10"), (3, "1.1")])
def test_versions(new_image, qemu_img, tmp_path, version, compat):
    path = new_image(3 * MiB, version=version)
    data = random.Random(version).randbytes(200_000)
    with cowdisk.open(path) as img:
        assert img.info.version == version
        img.pwrite(data, 12_345)
    assert qemu_img.info(path)["format-specific"]["data"]["compat"] == compat
    model = bytearray(3 * MiB)
    model[12_345 : 12_345 + len(data)] = data
    qemu_img.assert_clean(path)
    qemu_img.assert_same_as_raw(path, bytes(model), tmp_path)


@pytest.mark.parametrize("cluster_size", [512, 1024, 4096, 65536, 1 * MiB, 2 * MiB])
def test_cluster_sizes(new_image, qemu_img, cluster_size):
    path = new_image(4 * MiB, cluster_size=cluster_size)
    with cowdisk.open(path) as img:
        assert img.info.cluster_size == cluster_size
        boundary = cluster_size - min(1000, cluster_size // 2)
        img.pwrite(b"z" * 3000, boundary)  # straddles a cluster boundary
        assert img.pread(3002, boundary - 1) == b"\0" + b"z" * 3000 + b"\0"
    assert qemu_img.info(path)["cluster-size"] == cluster_size
    qemu_img.assert_clean(path)


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_bits(new_image, qemu_img, refcount_bits):
    path = new_image(2 * MiB, refcount_bits=refcount_bits)
    with cowdisk.open(path) as img:
        assert img.info.refcount_bits == refcount_bits
        img.pwrite(b"r" * 70_000, 1)
    assert qemu_img.info(path)["format-specific"]["data"]["refcount-bits"] == refcount_bits
    qemu_img.assert_clean(path)


def test_lazy_refcounts(new_image, qemu_img):
    path = new_image(2 * MiB, lazy_refcounts=True)
    with cowdisk.open(path) as img:
        assert img.info.lazy_refcounts is True
        img.pwrite(b"lazy", 100)
    assert qemu_img.info(path)["format-specific"]["data"]["lazy-refcounts"] is True
    qemu_img.assert_clean(path)


def test_zstd_compression_type(new_image, qemu_img):
    path = new_image(2 * MiB, compression_type="zstd")
    with cowdisk.open(path) as img:
        assert img.info.compression_type == "zstd"
    assert qemu_img.info(path)["format-specific"]["data"]["compression-type"] == "zstd"
    qemu_img.assert_clean(path)


def test_read_only_flag_in_info(new_image):
    path = new_image(1 * MiB)
    with cowdisk.open(path, readonly=True) as img:
        assert img.readonly and img.info.read_only
    with cowdisk.open(path) as img:
        assert not img.readonly and not img.info.read_only


# --- backing files ------------------------------------------------------------------------


@pytest.fixture
def base_image(new_image):
    """A 4 MiB qcow2 base filled with a pattern; returns (path, contents)."""
    size = 4 * MiB
    path = new_image(size, name="base.qcow2")
    contents = random.Random(99).randbytes(size)
    with cowdisk.open(path) as img:
        img.pwrite(contents, 0)
    return path, contents


def test_backing_chain(base_image, tmp_path, qemu_img):
    base, contents = base_image
    overlay = tmp_path / "overlay.qcow2"
    cowdisk.create(overlay, len(contents), backing_file=str(base), backing_format="qcow2")
    assert qemu_img.info(overlay)["backing-filename"] == str(base)
    with cowdisk.open(overlay) as img:
        info = img.info
        assert info.backing_file == str(base)
        assert info.backing_format == "qcow2"
        assert info.backing_depth == 1
        assert img.pread(len(contents), 0) == contents
        img.pwrite(b"OVERLAY" * 10_000, 65_000)  # partial clusters: COW from the base
        merged = bytearray(contents)
        merged[65_000 : 65_000 + 70_000] = b"OVERLAY" * 10_000
        assert img.pread(200_000, 0) == merged[:200_000]
    qemu_img.assert_clean(overlay)
    qemu_img.assert_same_as_raw(overlay, bytes(merged), tmp_path)
    qemu_img.assert_same_as_raw(base, contents, tmp_path)  # base untouched


def test_backing_size_defaults_to_backing_file(base_image, tmp_path):
    base, contents = base_image
    overlay = tmp_path / "overlay.qcow2"
    cowdisk.create(overlay, 0, backing_file=base, backing_format="qcow2")
    with cowdisk.open(overlay) as img:
        assert img.size == len(contents)


def test_relative_backing_name_resolves_next_to_image(base_image, tmp_path, monkeypatch):
    base, contents = base_image
    overlay = tmp_path / "rel.qcow2"
    cowdisk.create(overlay, len(contents), backing_file="base.qcow2", backing_format="qcow2")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with cowdisk.open(overlay, readonly=True) as img:
        assert img.info.backing_file == "base.qcow2"
        assert img.pread(1000, 4_000_000) == contents[4_000_000:4_001_000]


def test_raw_backing_file(tmp_path, qemu_img):
    raw = tmp_path / "base.raw"
    contents = random.Random(5).randbytes(2 * MiB)
    raw.write_bytes(contents)
    overlay = tmp_path / "over.qcow2"
    cowdisk.create(overlay, 2 * MiB, backing_file=str(raw), backing_format="raw")
    with cowdisk.open(overlay) as img:
        assert img.info.backing_format == "raw"
        assert img.pread(2 * MiB, 0) == contents
        img.pwrite(b"\0" * 10, 1_000_000)
    expected = bytearray(contents)
    expected[1_000_000:1_000_010] = bytes(10)
    qemu_img.assert_same_as_raw(overlay, bytes(expected), tmp_path)
    assert raw.read_bytes() == contents


def test_follow_backing_false(base_image, tmp_path):
    base, contents = base_image
    overlay = tmp_path / "nob.qcow2"
    cowdisk.create(overlay, len(contents), backing_file=str(base), backing_format="qcow2")
    with cowdisk.open(overlay, readonly=True, follow_backing=False) as img:
        assert img.info.backing_depth == 0
        assert img.info.backing_file == str(base)
        with pytest.raises(cowdisk.Error) as exc:
            img.pread(10, 0)
        assert exc.value.errno == errno.ENOTSUP


def test_max_backing_depth(base_image, tmp_path):
    base, _ = base_image
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    cowdisk.create(mid, 0, backing_file=str(base), backing_format="qcow2")
    cowdisk.create(top, 0, backing_file=str(mid), backing_format="qcow2")
    with cowdisk.open(top, readonly=True) as img:
        assert img.info.backing_depth == 2
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.open(top, readonly=True, max_backing_depth=1)
    assert exc.value.errno == errno.ELOOP
    assert "backing" in exc.value.strerror
    assert exc.value.filename == str(top)
    assert exc.value.strerror
