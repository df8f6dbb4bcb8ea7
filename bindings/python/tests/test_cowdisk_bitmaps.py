"""Persistent dirty bitmaps through the Python binding, checked against qemu-img."""

from __future__ import annotations

import errno
import shutil
import struct

import pytest

import cowdisk
from cowdisk import BitmapInfo, DirtyExtent
from conftest import MiB

KiB = 1024
SIZE = 4 * MiB


def by_name(img) -> dict:
    return {b.name: b for b in img.bitmaps()}


def test_add_write_list_extents_and_persist(new_image, qemu_img):
    path = new_image(SIZE)
    with cowdisk.open(path) as img:
        assert img.bitmaps() == []
        img.bitmap_add("a")
        img.bitmap_add("b", enabled=False)
        img.bitmap_add("fine", granularity=512)
        assert img.bitmaps() == [
            BitmapInfo("a", 64 * KiB, True, False, 0),
            BitmapInfo("b", 64 * KiB, False, False, 0),
            BitmapInfo("fine", 512, True, False, 0),
        ]
        img.pwrite(b"x" * 4096, MiB + 512)
        bm = by_name(img)
        assert (bm["a"].dirty_bytes, bm["b"].dirty_bytes, bm["fine"].dirty_bytes) == (
            64 * KiB,
            0,
            4 * KiB,
        )
        assert img.dirty_extents("fine") == [
            DirtyExtent(0, MiB + 512, False),
            DirtyExtent(MiB + 512, 4096, True),
            DirtyExtent(MiB + 512 + 4096, SIZE - MiB - 512 - 4096, False),
        ]
        assert img.dirty_extents("a", MiB - 100, 200 * KiB) == [
            DirtyExtent(MiB - 100, 100, False),
            DirtyExtent(MiB, 64 * KiB, True),
            DirtyExtent(MiB + 64 * KiB, 200 * KiB - 100 - 64 * KiB, False),
        ]
        assert img.dirty_extents("b") == [DirtyExtent(0, SIZE, False)]
        assert img.dirty_extents("a", SIZE) == []
        assert img.dirty_extents("a", 0, 0) == []

        img.bitmap_enable("b")
        img.write_zeroes(2 * MiB, 64 * KiB)
        img.bitmap_disable("b")
        img.discard(3 * MiB, 64 * KiB)
        bm = by_name(img)
        assert not bm["b"].enabled and bm["b"].dirty_bytes == 64 * KiB
        assert bm["a"].dirty_bytes == 3 * 64 * KiB  # write, zeroes, discard

        img.bitmap_merge("fine", "b")
        assert by_name(img)["fine"].dirty_bytes == 4 * KiB + 2 * 64 * KiB
        img.bitmap_clear("a")
        assert by_name(img)["a"].dirty_bytes == 0
        img.pwrite(b"y", 0)
        img.bitmap_add("gone")
        img.bitmap_remove("gone")
        assert [b.name for b in img.bitmaps()] == ["a", "b", "fine"]

    qemu_img.assert_clean(path)
    info = qemu_img.info(path)
    qbitmaps = {b["name"]: b for b in info["format-specific"]["data"]["bitmaps"]}
    assert set(qbitmaps) == {"a", "b", "fine"}
    assert qbitmaps["fine"]["granularity"] == 512
    assert "auto" in qbitmaps["a"]["flags"] and "auto" not in qbitmaps["b"]["flags"]
    assert all("in-use" not in b["flags"] for b in qbitmaps.values())

    with cowdisk.open(path, readonly=True) as img:
        bm = by_name(img)
        assert bm["a"] == BitmapInfo("a", 64 * KiB, True, False, 64 * KiB)
        assert bm["b"] == BitmapInfo("b", 64 * KiB, False, False, 64 * KiB)
        assert bm["fine"].dirty_bytes == 4 * KiB + 2 * 64 * KiB + 512
        assert img.dirty_extents("b") == [
            DirtyExtent(0, 2 * MiB, False),
            DirtyExtent(2 * MiB, 64 * KiB, True),
            DirtyExtent(2 * MiB + 64 * KiB, 2 * MiB - 64 * KiB, False),
        ]


def test_dirty_extents_spanning_many_calls(new_image):
    path = new_image(SIZE)
    with cowdisk.open(path) as img:
        img.bitmap_add("fine", granularity=512)
        # Every other sector of the first 2 MiB: 4096 dirty runs, more than one C call.
        for off in range(0, 2 * MiB, 1024):
            img.pwrite(b"z" * 512, off)
        runs = img.dirty_extents("fine")
        expected = []
        for off in range(0, 2 * MiB, 1024):
            expected += [DirtyExtent(off, 512, True), DirtyExtent(off + 512, 512, False)]
        expected[-1] = DirtyExtent(2 * MiB - 512, SIZE - 2 * MiB + 512, False)
        assert runs == expected
        assert sum(e.length for e in runs if e.dirty) == by_name(img)["fine"].dirty_bytes
        assert img.dirty_extents("fine", 1000, 100) == [
            DirtyExtent(1000, 24, False),
            DirtyExtent(1024, 76, True),
        ]


def test_merge_from_another_image(new_image, qemu_img):
    dst, src = new_image(SIZE), new_image(SIZE)
    with cowdisk.open(dst) as a, cowdisk.open(src) as b:
        a.bitmap_add("target", granularity=65536)
        b.bitmap_add("source", granularity=4096)
        b.pwrite(b"s" * 4096, MiB + 8192)
        a.bitmap_merge("target", "source", source=b)
        assert a.dirty_extents("target") == [
            DirtyExtent(0, MiB, False),
            DirtyExtent(MiB, 64 * KiB, True),
            DirtyExtent(MiB + 64 * KiB, SIZE - MiB - 64 * KiB, False),
        ]
        assert by_name(b)["source"].dirty_bytes == 4096
        with pytest.raises(cowdisk.Error) as e:
            a.bitmap_merge("target", "missing", source=b)
        assert e.value.errno == errno.ENOENT
        with pytest.raises(TypeError):
            a.bitmap_merge("target", "source", source="not an image")
    closed = cowdisk.open(src, readonly=True)
    closed.close()
    with cowdisk.open(dst) as a:
        with pytest.raises(ValueError):
            a.bitmap_merge("target", "source", source=closed)
    qemu_img.assert_clean(dst)
    qemu_img.assert_clean(src)


def test_errors(new_image):
    path = new_image(SIZE)
    with cowdisk.open(path) as img:
        img.bitmap_add("a")
        for call, code in [
            (lambda: img.bitmap_add("a"), errno.EINVAL),
            (lambda: img.bitmap_add("g", granularity=1000), errno.EINVAL),
            (lambda: img.bitmap_add("g", granularity=256), errno.EINVAL),
            (lambda: img.bitmap_add(""), errno.EINVAL),
            (lambda: img.bitmap_add("n" * 1024), errno.EINVAL),
            (lambda: img.bitmap_remove("nope"), errno.ENOENT),
            (lambda: img.bitmap_clear("nope"), errno.ENOENT),
            (lambda: img.bitmap_enable("nope"), errno.ENOENT),
            (lambda: img.bitmap_merge("nope", "a"), errno.ENOENT),
            (lambda: img.dirty_extents("nope"), errno.ENOENT),
            (lambda: img.dirty_extents("a", SIZE + 512), errno.EINVAL),
        ]:
            with pytest.raises(cowdisk.Error) as e:
                call()
            assert e.value.errno == code, e.value
        img.bitmap_add("n" * 1023)  # the longest name
        assert "n" * 1023 in by_name(img)
        with pytest.raises(ValueError):
            img.bitmap_add("a\0b")
        with pytest.raises(TypeError):
            img.bitmap_add(b"bytes")
        with pytest.raises(cowdisk.Error):
            img.bitmap_add("neg", granularity=-1)
    with cowdisk.open(path, readonly=True) as img:
        with pytest.raises(cowdisk.Error) as e:
            img.bitmap_add("ro")
        assert e.value.errno == errno.EROFS
        with pytest.raises(cowdisk.Error) as e:
            img.bitmap_clear("a")
        assert e.value.errno == errno.EROFS
    with pytest.raises(ValueError):
        img.bitmaps()


def test_version_2_image_has_no_bitmaps(new_image):
    path = new_image(SIZE, version=2)
    with cowdisk.open(path) as img:
        assert img.bitmaps() == []
        with pytest.raises(cowdisk.Error) as e:
            img.bitmap_add("a")
        assert e.value.errno == errno.ENOTSUP


def test_bitmap_in_use_on_disk_is_inconsistent(new_image, tmp_path, qemu_img):
    path = new_image(SIZE)
    with cowdisk.open(path) as img:
        img.bitmap_add("a")
        img.pwrite(b"a" * 512, 0)
    copy = tmp_path / "copy.qcow2"
    with cowdisk.open(path) as img:  # a read-write open marks the bitmaps in use
        shutil.copyfile(path, copy)
    with cowdisk.open(copy) as img:
        (info,) = img.bitmaps()
        assert info == BitmapInfo("a", 64 * KiB, True, True, 0)
        for call in (lambda: img.bitmap_clear("a"), lambda: img.dirty_extents("a")):
            with pytest.raises(cowdisk.Error) as e:
                call()
            assert e.value.errno == errno.ENOTSUP
        img.bitmap_remove("a")
        assert img.bitmaps() == []
    qemu_img.assert_clean(copy)
    with cowdisk.open(path, readonly=True) as img:
        assert img.bitmaps() == [BitmapInfo("a", 64 * KiB, True, False, 64 * KiB)]


def _bitmap_directory_offset(path) -> int:
    """The offset of the bitmap directory, from the image's header extension."""
    data = path.read_bytes()
    (header_length,) = struct.unpack_from(">I", data, 100)
    pos = header_length
    while True:
        magic, length = struct.unpack_from(">II", data, pos)
        if magic == 0:
            raise AssertionError("no bitmaps extension")
        if magic == 0x23852875:
            return struct.unpack_from(">Q", data, pos + 8 + 16)[0]
        pos += 8 + (length + 7) // 8 * 8


def test_drop_bitmaps(new_image):
    path = new_image(SIZE)
    with cowdisk.open(path) as img:
        img.bitmap_add("a")
        img.pwrite(b"a" * 512, 0)
    with cowdisk.open(path, drop_bitmaps=True) as img:  # readable bitmaps are kept
        assert [b.name for b in img.bitmaps()] == ["a"]
    # A reserved flag bit in the directory entry: bitmaps cowdisk cannot keep.
    directory = _bitmap_directory_offset(path)
    with path.open("r+b") as f:
        f.seek(directory + 12)
        (flags,) = struct.unpack(">I", f.read(4))
        f.seek(directory + 12)
        f.write(struct.pack(">I", flags | 0x10))
    with pytest.raises(cowdisk.Error):
        cowdisk.open(path)
    with cowdisk.open(path, readonly=True) as img:
        with pytest.raises(cowdisk.Error) as e:
            img.bitmaps()
        assert e.value.errno == errno.ENOTSUP
    with cowdisk.open(path, drop_bitmaps=True) as img:  # given up: none left
        assert img.bitmaps() == []
        img.pwrite(b"b" * 512, 0)
    with cowdisk.open(path) as img:  # the bitmaps are gone: an ordinary image
        assert img.bitmaps() == []
        img.check(repair="leaks")
        assert img.check().clean
        assert img.pread(512, 0) == b"b" * 512


def test_qemu_img_bitmaps_interop(new_image, qemu_img, tmp_path):
    path = tmp_path / "q.qcow2"
    qemu_img.run("create", "-q", "-f", "qcow2", path, "4M", check=True)
    qemu_img.run("bitmap", "--add", "-g", "65536", path, "qb", check=True)
    qemu_img.run("bitmap", "--add", "--disable", "-g", "1048576", path, "qd", check=True)
    with cowdisk.open(path) as img:
        assert img.bitmaps() == [
            BitmapInfo("qb", 64 * KiB, True, False, 0),
            BitmapInfo("qd", MiB, False, False, 0),
        ]
        img.pwrite(b"w" * 100, 3 * MiB + 10)
        img.bitmap_add("ours", granularity=4096)
        img.pwrite(b"w" * 100, 5000)
    qemu_img.assert_clean(path)
    qemu_img.run("bitmap", "--add", path, "merged", check=True)
    qemu_img.run("bitmap", "--merge", "ours", path, "merged", check=True)
    qemu_img.run("bitmap", "--merge", "qb", path, "merged", check=True)
    qemu_img.run("bitmap", "--clear", path, "qb", check=True)
    qemu_img.assert_clean(path)
    with cowdisk.open(path, readonly=True) as img:
        bm = by_name(img)
        assert bm["qb"].dirty_bytes == 0 and bm["qd"].dirty_bytes == 0
        assert bm["ours"].dirty_bytes == 4096
        assert img.dirty_extents("merged") == [
            DirtyExtent(0, 64 * KiB, True),
            DirtyExtent(64 * KiB, 3 * MiB - 64 * KiB, False),
            DirtyExtent(3 * MiB, 64 * KiB, True),
            DirtyExtent(3 * MiB + 64 * KiB, MiB - 64 * KiB, False),
        ]
    # cowdisk removes a bitmap qemu-img made; qemu-img agrees.
    with cowdisk.open(path) as img:
        img.bitmap_remove("qd")
    qemu_img.assert_clean(path)
    names = [b["name"] for b in qemu_img.info(path)["format-specific"]["data"]["bitmaps"]]
    assert names == ["qb", "ours", "merged"]
