"""The file-like view of an image: ``Image.file()`` / ``cowdisk.DiskFile``."""

from __future__ import annotations

import io
import os
import random
import shutil

import pytest

import cowdisk

from conftest import MiB


def test_copyfileobj_both_ways(new_image, tmp_path, qemu_img):
    data = random.Random(9).randbytes(3 * MiB + 12345)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    path = new_image(4 * MiB)
    with cowdisk.open(path) as img, img.file() as f, open(src, "rb") as inp:
        assert f.writable() and f.seekable() and f.readable()
        shutil.copyfileobj(inp, f, length=100_000)
        assert f.tell() == len(data)
    with cowdisk.open(path, readonly=True) as img:
        f = img.file()
        assert not f.writable()
        out = io.BytesIO()
        shutil.copyfileobj(f, out)
        got = out.getvalue()
        assert len(got) == 4 * MiB and got[: len(data)] == data
        assert got[len(data) :] == bytes(4 * MiB - len(data))
        assert f.read() == b""  # at the end
        f.close()
        assert not img.closed
    qemu_img.assert_same_as_raw(path, data + bytes(4 * MiB - len(data)), tmp_path)


def test_seek_tell_and_buffered_reads(new_image):
    path = new_image(MiB)
    with cowdisk.open(path) as img:
        img.pwrite(b"0123456789", 1000)
        f = img.file()
        assert f.seek(1000) == 1000 and f.read(4) == b"0123" and f.tell() == 1004
        assert f.seek(2, os.SEEK_CUR) == 1006 and f.read(2) == b"67"
        assert f.seek(-10, os.SEEK_END) == MiB - 10 and len(f.read(100)) == 10
        with pytest.raises(ValueError):
            f.seek(-1)
        f.seek(1000)
        buffered = io.BufferedReader(f, 64)
        assert buffered.read(10) == b"0123456789"
        buffered.detach()  # closing the buffered reader would close the view
        f.seek(MiB - 2)
        with pytest.raises(cowdisk.Error):
            f.write(b"abc")  # past the end of the disk
        f.close()
        with pytest.raises(ValueError):
            f.read(1)
