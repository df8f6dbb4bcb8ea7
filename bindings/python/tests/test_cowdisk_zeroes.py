"""write_zeroes, discard, resize and map (block status) through the binding, checked
against a model and against qemu-img / qemu-io."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import shutil
import subprocess

import pytest

import cowdisk
from conftest import MiB

KiB = 1 << 10
CS = 64 * KiB


@pytest.fixture(scope="session")
def qemu_io() -> str:
    exe = shutil.which("qemu-io")
    if exe is None:
        pytest.skip("qemu-io is not installed")
    return exe


def run_qemu_io(exe: str, path, *cmds: str, fmt: str = "qcow2") -> str:
    args = [exe, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run([*args, str(path)], capture_output=True, text=True, check=True)
    assert "failed" not in r.stdout.lower(), r.stdout
    return r.stdout


def qemu_map(qemu_img, path) -> list[dict]:
    out = qemu_img.run("map", "--output=json", path, check=True).stdout
    return json.loads(out)


def assert_map_matches(qemu_img, path, *, batches=True) -> list[cowdisk.Extent]:
    """Image.map() equals `qemu-img map --output=json`, field by field."""
    theirs = qemu_map(qemu_img, path)
    with cowdisk.open(path, readonly=True) as img:
        size = img.size
        ours = img.map()
        # A map of a sub-range covers exactly that range.
        if batches and size > 3 * CS:
            part = img.map(CS + 100, size - 3 * CS)
            assert part[0].start == CS + 100
            assert part[-1].start + part[-1].length == size - 2 * CS + 100
            assert sum(e.length for e in part) == size - 3 * CS
    if size == 0:
        assert ours == []
        return ours
    assert len(ours) == len(theirs), f"{path}:\nours:   {ours}\ntheirs: {theirs}"
    for o, t in zip(ours, theirs):
        for field in ("start", "length", "depth", "present", "zero", "data", "compressed"):
            assert getattr(o, field) == t[field], f"{field} of {o} vs {t}"
        assert o.offset == t.get("offset"), f"offset of {o} vs {t}"
    return ours


def read_all(path) -> bytes:
    with cowdisk.open(path, readonly=True) as img:
        return img.pread(img.size, 0)


# --- write_zeroes ------------------------------------------------------------------------


@pytest.mark.parametrize("cluster_size", [512, 4096, CS])
@pytest.mark.parametrize("version", [2, 3])
def test_write_zeroes_over_data_reads_zeros(new_image, qemu_img, tmp_path, cluster_size, version):
    size = 4 * MiB
    path = new_image(size, cluster_size=cluster_size, version=version)
    rng = random.Random(cluster_size * 10 + version)
    model = bytearray(size)
    with cowdisk.open(path) as img:
        data = rng.randbytes(3 * MiB)
        img.pwrite(data, 512 * KiB)
        model[512 * KiB : 512 * KiB + len(data)] = data
        # Aligned, unaligned, single byte, crossing cluster boundaries, with and
        # without unmap, over data and over unallocated space.
        for _ in range(30):
            length = rng.randrange(1, 3 * cluster_size + 999)
            offset = rng.randrange(0, size - length)
            if rng.random() < 0.3:
                offset -= offset % cluster_size
                length = min(size - offset, cluster_size * rng.randrange(1, 4))
            img.write_zeroes(offset, length, may_unmap=rng.random() < 0.5)
            model[offset : offset + length] = bytes(length)
            assert img.pread(length, offset) == bytes(length)
            lo, hi = max(0, offset - 700), min(size, offset + length + 700)
            assert img.pread(hi - lo, lo) == model[lo:hi]
            if rng.random() < 0.3:  # data written again over zeroes
                o = rng.randrange(0, size - 5000)
                d = rng.randbytes(rng.randrange(1, 5000))
                img.pwrite(d, o)
                model[o : o + len(d)] = d
        img.write_zeroes(size - 1, 1)
        model[size - 1] = 0
        img.write_zeroes(0, 0)  # empty: a no-op
    assert read_all(path) == model
    qemu_img.assert_clean(path)
    qemu_img.assert_same_as_raw(path, bytes(model), tmp_path)


def test_write_zeroes_whole_clusters_become_zero_clusters(new_image, qemu_img):
    path = new_image(2 * MiB)
    with cowdisk.open(path) as img:
        img.pwrite(b"\x55" * MiB, 0)
        img.write_zeroes(0, 2 * CS)  # keeps the host clusters
        img.write_zeroes(4 * CS, 2 * CS, may_unmap=True)  # releases them
        m = img.map(0, MiB)
        assert img.pread(MiB, 0) == bytes(2 * CS) + b"\x55" * 2 * CS + bytes(2 * CS) + b"\x55" * (
            MiB - 6 * CS
        )
    assert [(e.start, e.length, e.zero, e.data, e.present) for e in m] == [
        (0, 2 * CS, True, False, True),
        (2 * CS, 2 * CS, False, True, True),
        (4 * CS, 2 * CS, True, False, True),
        (6 * CS, MiB - 6 * CS, False, True, True),
    ]
    assert m[0].offset is not None, "zeroed without unmap keeps its host cluster"
    assert m[2].offset is None, "zeroed with unmap has no host cluster"
    qemu_img.assert_clean(path)
    assert_map_matches(qemu_img, path)


def test_write_zeroes_hides_the_backing_file(new_image, qemu_img, tmp_path):
    base = new_image(MiB, name="base.qcow2")
    with cowdisk.open(base) as img:
        img.pwrite(b"\xbb" * MiB, 0)
    top = tmp_path / "top.qcow2"
    cowdisk.create(top, 0, backing_file="base.qcow2", backing_format="qcow2")
    with cowdisk.open(top) as img:
        img.write_zeroes(100, 3 * CS)  # unaligned: head and tail clusters hold backing data
        img.write_zeroes(5 * CS, 2 * CS)
        got = img.pread(MiB, 0)
    expected = bytearray(b"\xbb" * MiB)
    expected[100 : 100 + 3 * CS] = bytes(3 * CS)
    expected[5 * CS : 7 * CS] = bytes(2 * CS)
    assert got == expected
    assert read_all(base) == b"\xbb" * MiB
    qemu_img.assert_clean(top)
    qemu_img.assert_clean(base)


# --- discard -----------------------------------------------------------------------------


def test_discard_releases_whole_clusters_only(new_image, qemu_img):
    path = new_image(2 * MiB)
    with cowdisk.open(path) as img:
        img.pwrite(b"\x77" * MiB, 0)
        img.discard(CS + 1000, 3 * CS)  # whole clusters 2 and 3 only
        got = img.pread(MiB, 0)
        assert got[: 2 * CS] == b"\x77" * 2 * CS
        assert got[2 * CS : 4 * CS] == bytes(2 * CS)
        assert got[4 * CS :] == b"\x77" * (MiB - 4 * CS)
        img.discard(8 * CS, 100)  # less than a cluster: nothing
        assert img.pread(CS, 8 * CS) == b"\x77" * CS
        img.discard(0, 0)
        # Freed clusters are reused by later writes.
        host_before = img.info.host_size
        img.pwrite(b"\x12" * 2 * CS, 20 * CS)
        assert img.info.host_size == host_before
        assert img.pread(2 * CS, 20 * CS) == b"\x12" * 2 * CS
    qemu_img.assert_clean(path)
    assert_map_matches(qemu_img, path)


def test_discard_unmap_punches_the_file(new_image, qemu_img):
    path = new_image(16 * MiB)
    with cowdisk.open(path) as img:
        img.pwrite(os.urandom(8 * MiB), 0)
        img.flush()
    full = os.stat(path).st_blocks
    # Without discard_unmap the file keeps its blocks.
    with cowdisk.open(path) as img:
        img.discard(0, MiB)
        img.flush()
    assert os.stat(path).st_blocks >= full - 8  # metadata only
    # With it, discarded clusters are punched out.
    with cowdisk.open(path, discard_unmap=True) as img:
        img.discard(MiB, 4 * MiB)
        img.flush()
        blocks = os.stat(path).st_blocks
        assert blocks * 512 <= full * 512 - 4 * MiB + 64 * KiB, (full, blocks)
        assert img.pread(4 * MiB, MiB) == bytes(4 * MiB)
        img.write_zeroes(5 * MiB, MiB, may_unmap=True)
        img.flush()
        assert os.stat(path).st_blocks * 512 <= blocks * 512 - MiB + 64 * KiB
    qemu_img.assert_clean(path)
    assert_map_matches(qemu_img, path)


def test_readonly_and_range_errors(new_image):
    path = new_image(MiB)
    with cowdisk.open(path, readonly=True) as img:
        for call in (
            lambda: img.write_zeroes(0, 512),
            lambda: img.discard(0, CS),
            lambda: img.resize(2 * MiB),
        ):
            with pytest.raises(cowdisk.Error) as e:
                call()
            assert e.value.errno == errno.EROFS
    with cowdisk.open(path) as img:
        for call in (
            lambda: img.write_zeroes(MiB, 1),
            lambda: img.write_zeroes(MiB - 1, 2),
            lambda: img.discard(0, MiB + 1),
            lambda: img.write_zeroes(-1, 1),
            lambda: img.map(MiB + 1),
        ):
            with pytest.raises(cowdisk.Error) as e:
                call()
            assert e.value.errno == errno.EINVAL
        with pytest.raises(ValueError):
            img.discard(0, -1)
        assert img.map(MiB) == []
        assert img.map(0, 0) == []
    with pytest.raises(ValueError):
        img.write_zeroes(0, 1)
    with pytest.raises(ValueError):
        img.map()


# --- resize ------------------------------------------------------------------------------


def test_resize_grow_shrink_force_and_refusal(new_image, qemu_img):
    path = new_image(MiB)
    with cowdisk.open(path) as img:
        img.pwrite(b"\x42" * CS, 512 * KiB)
        img.resize(3 * MiB)
        assert img.size == 3 * MiB == img.info.virtual_size
        assert img.pread(2 * MiB, MiB) == bytes(2 * MiB)
        img.pwrite(b"\x43", 3 * MiB - 1)
        # Shrinking over allocated data is refused (EINVAL) and changes nothing.
        with pytest.raises(cowdisk.Error) as e:
            img.resize(256 * KiB)
        assert e.value.errno == errno.EINVAL
        assert e.value.filename == os.fspath(path)
        assert img.size == 3 * MiB
        assert img.pread(CS, 512 * KiB) == b"\x42" * CS
        # Shrinking over unallocated space works without force.
        with pytest.raises(cowdisk.Error):
            img.resize(2 * MiB)  # the byte at the end is allocated
        img.write_zeroes(3 * MiB - CS, CS, may_unmap=True)
        img.discard(3 * MiB - CS, CS)
        img.resize(2 * MiB)
        assert img.size == 2 * MiB
        # Not a multiple of 512.
        with pytest.raises(cowdisk.Error) as e:
            img.resize(MiB + 1)
        assert e.value.errno == errno.EINVAL
        # force discards the data past the end; growing again reads zeros.
        img.resize(256 * KiB, force=True)
        assert img.size == 256 * KiB
        with pytest.raises(cowdisk.Error) as e:
            img.pread(1, 256 * KiB)
        assert e.value.errno == errno.EINVAL
        img.resize(MiB)
        assert img.pread(MiB, 0) == bytes(MiB)
    assert qemu_img.info(path)["virtual-size"] == MiB
    qemu_img.assert_clean(path)
    with cowdisk.open(path) as img:
        assert img.size == MiB
        img.resize(0, force=True)
        assert img.size == 0
        assert img.map() == []
    assert qemu_img.info(path)["virtual-size"] == 0
    qemu_img.assert_clean(path)


def test_resize_with_snapshots_cannot_shrink(new_image, qemu_img):
    path = new_image(MiB)
    qemu_img.run("snapshot", "-c", "snap1", path, check=True)
    with cowdisk.open(path) as img:
        img.resize(2 * MiB)
        with pytest.raises(cowdisk.Error) as e:
            img.resize(512 * KiB)
        assert e.value.errno == errno.ENOTSUP
        assert img.size == 2 * MiB
    qemu_img.assert_clean(path)


# --- map ---------------------------------------------------------------------------------


def test_extent_is_a_frozen_dataclass(new_image):
    path = new_image(MiB)
    with cowdisk.open(path) as img:
        img.pwrite(b"x" * CS, 0)
        gen = img.extents()
        first = next(gen)
        rest = list(gen)
    assert isinstance(first, cowdisk.Extent)
    assert dataclasses.fields(first)[0].name == "start"
    assert [f.name for f in dataclasses.fields(cowdisk.Extent)] == [
        "start",
        "length",
        "depth",
        "present",
        "zero",
        "data",
        "compressed",
        "offset",
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.start = 1
    assert (first.start, first.length, first.data, first.depth) == (0, CS, True, 0)
    assert first.offset is not None and first.offset % CS == 0
    assert rest == [cowdisk.Extent(CS, MiB - CS, 0, False, True, False, False, None)]


def test_map_matches_qemu_img_on_our_image(new_image, qemu_img):
    path = new_image(16 * MiB)
    with cowdisk.open(path) as img:
        img.pwrite(b"\x01" * (320 * KiB - 10000), 10000)
        img.write_zeroes(MiB, 5 * CS)
        img.pwrite(b"\x02" * 3 * CS, 2 * MiB)
        img.write_zeroes(2 * MiB, CS, may_unmap=True)
        img.discard(0, CS)
        img.write_zeroes(12 * MiB, 100)
        img.pwrite(b"\x03" * MiB, 15 * MiB)
        img.discard(15 * MiB, 2 * CS)
    qemu_img.assert_clean(path)
    assert_map_matches(qemu_img, path)


def test_map_in_many_batches(new_image, qemu_img):
    # 4 KiB clusters alternating data / zero / unallocated: ~3000 extents, more than
    # one batch of cowdisk_block_status.
    path = new_image(12 * MiB, cluster_size=4096)
    with cowdisk.open(path) as img:
        for i in range(3000):
            kind = i % 3
            if kind == 0:
                img.pwrite(b"\x09" * 4096, i * 4096)
            elif kind == 1:
                img.write_zeroes(i * 4096, 4096)
        ours = img.map()
        assert len(ours) >= 3000
        assert sum(e.length for e in ours) == img.size
    qemu_img.assert_clean(path)
    assert assert_map_matches(qemu_img, path) == ours


def test_map_matches_qemu_img_on_a_qemu_io_image(tmp_path, qemu_img, qemu_io):
    path = tmp_path / "q.qcow2"
    qemu_img.run("create", "-f", "qcow2", path, "16M", check=True)
    run_qemu_io(
        qemu_io,
        path,
        "write -P 1 0 1M",
        "write -z 2M 128k",
        "write -z -u 512k 64k",
        "discard 128k 64k",
        "write -P 5 3M 256k",
        "write -z 3M 64k",
        "write -c -P 7 4M 64k",
        "write -P 3 15M 64k",
    )
    m = assert_map_matches(qemu_img, path)
    compressed = [e for e in m if e.compressed]
    assert len(compressed) == 1 and compressed[0].offset is None and compressed[0].data
    # Our own changes on top of qemu's, then qemu's view again.
    with cowdisk.open(path) as img:
        img.write_zeroes(4 * MiB, CS)
        img.discard(15 * MiB, CS)
        img.write_zeroes(0, 2 * CS, may_unmap=True)
        img.pwrite(b"\x08" * CS, 8 * MiB)
    qemu_img.assert_clean(path)
    assert_map_matches(qemu_img, path)
    run_qemu_io(
        qemu_io,
        path,
        "read -P 0 0 128k",
        "read -P 1 192k 320k",
        "read -P 0 4M 64k",
        "read -P 8 8M 64k",
        "read -P 0 15M 1M",
    )


def test_map_matches_qemu_img_on_a_chain(tmp_path, qemu_img, qemu_io):
    base = tmp_path / "base.raw"
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img.run("create", "-f", "raw", base, "4M", check=True)
    run_qemu_io(qemu_io, base, "write -P 1 0 1M", "write -P 2 3M 64k", fmt="raw")
    qemu_img.run("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "6M", check=True)
    run_qemu_io(qemu_io, mid, "write -P 3 512k 128k", "write -z 1M 64k", "write -P 4 5M 64k")
    qemu_img.run(
        "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top, "8M", check=True
    )
    with cowdisk.open(top) as img:
        img.pwrite(b"\x05" * CS, 0)
        img.write_zeroes(2 * CS, CS, may_unmap=True)
        img.discard(3 * MiB, CS)
        img.write_zeroes(5 * MiB, 2 * CS)
        img.pwrite(b"\x06" * 2 * CS, 7 * MiB)
    m = assert_map_matches(qemu_img, top)
    assert {e.depth for e in m} == {0, 1, 2}
    assert_map_matches(qemu_img, mid)
    qemu_img.assert_clean(top)
    qemu_img.assert_clean(mid)
    # Data in the raw base file sits at its guest offset.
    raw_extents = [e for e in m if e.depth == 2 and e.data]
    assert raw_extents and all(e.offset == e.start for e in raw_extents)
