"""Reading and writing through the binding, checked against a model and qemu-img."""

from __future__ import annotations

import array
import gc
import random
import subprocess
import sys
import threading

import pytest

import cowdisk
from conftest import MiB, PYTHON_DIR


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
def test_round_trip_unaligned(new_image, qemu_img, tmp_path, cluster_size):
    size = 8 * MiB
    path = new_image(size, cluster_size=cluster_size)
    rng = random.Random(cluster_size)
    model = bytearray(size)
    with cowdisk.open(path) as img:
        assert img.size == size
        # Writes at odd offsets whose lengths straddle cluster boundaries, some overlapping.
        for _ in range(40):
            length = rng.randrange(1, 3 * cluster_size + 777)
            offset = rng.randrange(0, size - length)
            data = rng.randbytes(length)
            assert img.pwrite(data, offset) == length
            model[offset : offset + length] = data
            # Read back a window around the write, unaligned on both ends.
            lo = max(0, offset - rng.randrange(0, 1000))
            hi = min(size, offset + length + rng.randrange(0, 1000))
            assert img.pread(hi - lo, lo) == model[lo:hi]
        # Last byte of the disk and the very first byte.
        img.pwrite(b"\xee", size - 1)
        model[size - 1] = 0xEE
        img.pwrite(b"\x11", 0)
        model[0] = 0x11
    with cowdisk.open(path, readonly=True) as img:
        assert img.pread(size, 0) == model
        for _ in range(50):
            length = rng.randrange(0, 2 * cluster_size + 3)
            offset = rng.randrange(0, size - length + 1)
            assert img.pread(length, offset) == model[offset : offset + length]
    qemu_img.assert_clean(path)
    qemu_img.assert_same_as_raw(path, bytes(model), tmp_path)


def test_unwritten_areas_read_as_zeros(new_image):
    path = new_image(2 * MiB)
    with cowdisk.open(path) as img:
        assert img.pread(2 * MiB, 0) == bytes(2 * MiB)
        img.pwrite(b"abc", 70000)
        got = img.pread(65536 * 2, 0)
        assert got[70000:70003] == b"abc"
        assert got.count(0) == len(got) - 3


def test_large_single_write(new_image, qemu_img, tmp_path):
    size = 16 * MiB
    path = new_image(size, cluster_size=4096)
    data = random.Random(7).randbytes(5 * MiB + 123)
    with cowdisk.open(path) as img:
        img.pwrite(data, 333)
        assert img.pread(len(data), 333) == data
    model = bytearray(size)
    model[333 : 333 + len(data)] = data
    qemu_img.assert_clean(path)
    qemu_img.assert_same_as_raw(path, bytes(model), tmp_path)


def test_pwrite_accepts_any_buffer(new_image):
    path = new_image(1 * MiB)
    base = bytes(range(256)) * 4
    cases = [
        base,
        bytearray(base),
        memoryview(base),
        memoryview(bytearray(base))[10:500],
        memoryview(base)[3:77],  # read-only slice of bytes
        array.array("H", range(300)),
        memoryview(base)[::3],  # not contiguous: copied
        memoryview(array.array("I", range(64))).cast("B").cast("I", [8, 8]),  # 2-D
    ]
    with cowdisk.open(path) as img:
        offset = 12345
        for obj in cases:
            expected = memoryview(obj).tobytes()
            assert img.pwrite(obj, offset) == len(expected)
            assert img.pread(len(expected), offset) == expected
            offset += 65536 + 7
        for bad in ["text", 12, None]:
            with pytest.raises(TypeError):
                img.pwrite(bad, 0)


def test_pwrite_empty_is_a_no_op(new_image):
    path = new_image(1 * MiB)
    with cowdisk.open(path) as img:
        assert img.pwrite(b"", 100) == 0
        assert img.pread(0, 100) == b""
        assert img.pread(200, 0) == bytes(200)


def test_readinto(new_image):
    path = new_image(1 * MiB)
    payload = random.Random(3).randbytes(100_000)
    with cowdisk.open(path) as img:
        img.pwrite(payload, 60_000)

        buf = bytearray(70_000)
        assert img.readinto(buf, 60_001) == 70_000
        assert buf == payload[1:70_001]

        # Into the middle of a bigger buffer: bytes outside the view stay untouched.
        big = bytearray(b"\xaa" * 1000)
        assert img.readinto(memoryview(big)[100:900], 60_000) == 800
        assert big[:100] == b"\xaa" * 100 and big[900:] == b"\xaa" * 100
        assert big[100:900] == payload[:800]

        # Typed arrays: the count is bytes, not items.
        arr = array.array("I", [0]) * 10
        assert img.readinto(arr, 60_000) == 40
        assert arr.tobytes() == payload[:40]

        with pytest.raises(TypeError):
            img.readinto(b"immutable", 0)
        with pytest.raises(TypeError):
            img.readinto(memoryview(bytes(10)), 0)
        with pytest.raises(BufferError):
            img.readinto(memoryview(bytearray(10))[::2], 0)


def test_context_manager_closes(new_image):
    path = new_image(1 * MiB)
    with cowdisk.open(path) as img:
        assert not img.closed
        img.pwrite(b"x", 0)
    assert img.closed
    with pytest.raises(RuntimeError, match="boom"):
        with cowdisk.open(path) as img2:
            img2.pwrite(b"y", 1)
            raise RuntimeError("boom")
    assert img2.closed
    with cowdisk.open(path) as img3:
        assert img3.pread(2, 0) == b"xy"


def test_closed_image_raises_value_error(new_image):
    path = new_image(1 * MiB)
    img = cowdisk.open(path)
    assert img.close() is None
    assert img.close() is None  # idempotent
    calls = [
        lambda: img.pread(1, 0),
        lambda: img.pwrite(b"a", 0),
        lambda: img.readinto(bytearray(1), 0),
        lambda: img.flush(),
        lambda: img.info,
        lambda: img.size,
    ]
    for call in calls:
        with pytest.raises(ValueError, match="closed"):
            call()
    with pytest.raises(ValueError):
        with img:
            pass
    assert "closed" in repr(img)


def test_paths_may_be_str_pathlike_or_bytes(tmp_path):
    for i, conv in enumerate([str, lambda p: p, lambda p: bytes(str(p), "utf-8")]):
        p = tmp_path / f"p{i}.qcow2"
        cowdisk.create(conv(p), MiB)
        with cowdisk.open(conv(p)) as img:
            assert img.size == MiB
    with pytest.raises(ValueError, match="null"):
        cowdisk.open(str(tmp_path / "a\0b"))


def test_flush_makes_data_durable_without_close(tmp_path, qemu_img):
    # A child process writes, flushes and exits without closing: the data must be there.
    path = tmp_path / "flushed.qcow2"
    code = f"""
import os, sys
sys.path.insert(0, {str(PYTHON_DIR)!r})
import cowdisk
cowdisk.create({str(path)!r}, 4 << 20)
img = cowdisk.open({str(path)!r})
img.pwrite(b"durable" * 1000, 65530)
img.flush()
os._exit(0)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with cowdisk.open(path, readonly=True) as img:
        assert img.pread(7000, 65530) == b"durable" * 1000
    model = bytearray(4 << 20)
    model[65530 : 65530 + 7000] = b"durable" * 1000
    qemu_img.assert_same_as_raw(path, bytes(model), tmp_path)


def test_concurrent_writers(new_image, qemu_img, tmp_path):
    size = 8 * MiB
    path = new_image(size, cluster_size=4096)
    nthreads, chunk = 8, 10_000
    model = bytearray(size)
    errors = []
    with cowdisk.open(path) as img:

        def worker(t):
            try:
                rng = random.Random(t)
                for i in range(40):
                    # Threads interleave over the same clusters but never the same bytes.
                    off = (i * nthreads + t) * chunk + 5
                    data = rng.randbytes(chunk)
                    img.pwrite(data, off)
                    model[off : off + chunk] = data
                    assert img.pread(chunk, off) == data
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert img.pread(size, 0) == model
    qemu_img.assert_clean(path)
    qemu_img.assert_same_as_raw(path, bytes(model), tmp_path)


def test_close_waits_for_calls_in_progress(new_image):
    path = new_image(64 * MiB, cluster_size=4096)
    img = cowdisk.open(path)
    started = threading.Event()
    result = {}

    def reader():
        started.set()
        try:
            result["data"] = img.pread(64 * MiB, 0)
        except ValueError:  # close won the race before the read began
            result["data"] = None

    t = threading.Thread(target=reader)
    t.start()
    started.wait()
    img.close()
    t.join()
    assert result["data"] in (None, bytes(64 * MiB))


def test_unclosed_image_warns_and_is_closed_by_gc(new_image):
    path = new_image(1 * MiB)
    img = cowdisk.open(path)
    img.pwrite(b"gc", 10)
    with pytest.warns(ResourceWarning):
        del img
        gc.collect()
    with cowdisk.open(path) as img:
        assert img.pread(2, 10) == b"gc"


@pytest.mark.parametrize("extra", [[], ["-c"], ["-c", "-o", "compression_type=zstd"]])
def test_reads_images_made_by_qemu(qemu_img, tmp_path, extra):
    rng = random.Random(11)
    # Compressible but not trivial: random runs separated by zeros.
    data = bytearray(3 * MiB)
    for _ in range(60):
        off = rng.randrange(0, len(data) - 5000)
        data[off : off + 5000] = rng.randbytes(100) * 50
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    out = tmp_path / "qemu.qcow2"
    r = qemu_img.run("convert", "-f", "raw", "-O", "qcow2", *extra, raw, out)
    assert r.returncode == 0, r.stderr
    with cowdisk.open(out, readonly=True) as img:
        assert img.size == len(data)
        whole = img.pread(len(data), 0)
        assert whole == data
        assert img.pread(7777, 1_234_567) == data[1_234_567 : 1_234_567 + 7777]
