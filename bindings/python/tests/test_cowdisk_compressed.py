"""Compressed writes through the binding: ``Image.pwrite_compressed``."""

from __future__ import annotations

import errno
import json
import random

import pytest

import cowdisk

from conftest import MiB

CS = 65536


def _data(size: int) -> bytes:
    rng = random.Random(5)
    text = b"compressed clusters are packed back to back. " * (size // 45 + 1)
    data = bytearray(text[:size])
    data[3 * CS : 4 * CS] = rng.randbytes(CS)  # does not compress: a normal cluster
    data[6 * CS : 7 * CS] = bytes(CS)
    return bytes(data)


@pytest.mark.parametrize("kind", ["zlib", "zstd"])
@pytest.mark.parametrize("cache", [True, False])
def test_pwrite_compressed_is_read_by_qemu(new_image, qemu_img, tmp_path, kind, cache):
    size = 16 * CS + 4096  # the last cluster is partial
    data = _data(size)
    path = new_image(size, compression_type=kind)
    with cowdisk.open(path, compressed_cache=cache) as img:
        assert img.pwrite_compressed(data[: 8 * CS], 0) == 8 * CS
        for off in range(8 * CS, size, CS):
            img.pwrite_compressed(memoryview(data)[off : off + CS], off)
        assert img.pread(size, 0) == data
        assert any(e.compressed for e in img.map())
        # A normal write into a compressed cluster: decompress and copy on write.
        img.pwrite(b"new", 2 * CS + 10)
    data = data[: 2 * CS + 10] + b"new" + data[2 * CS + 13 :]
    qemu_img.assert_clean(path)
    qemu_img.assert_same_as_raw(path, data, tmp_path)
    out = qemu_img.run("check", "--output=json", path).stdout
    assert json.loads(out).get("compressed-clusters", 0) >= 10
    with cowdisk.open(path, readonly=True) as img:
        assert img.pread(size, 0) == data


def test_pwrite_compressed_rules(new_image):
    path = new_image(4 * MiB)
    with cowdisk.open(path, compressed_cache_size=1 * MiB) as img:
        with pytest.raises(cowdisk.Error) as exc:
            img.pwrite_compressed(b"x" * CS, 512)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(cowdisk.Error) as exc:
            img.pwrite_compressed(b"x" * 100, 0)
        assert exc.value.errno == errno.EINVAL
        img.pwrite(b"data", 0)
        with pytest.raises(cowdisk.Error) as exc:
            img.pwrite_compressed(b"x" * CS, 0)
        assert exc.value.errno == errno.EINVAL
        assert img.pread(4, 0) == b"data"
    with cowdisk.open(path, readonly=True) as img:
        with pytest.raises(cowdisk.Error) as exc:
            img.pwrite_compressed(b"x" * CS, CS)
        assert exc.value.errno == errno.EROFS
