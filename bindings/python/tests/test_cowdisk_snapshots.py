"""Internal snapshots and VM state through the Python binding, checked by qemu-img."""

from __future__ import annotations

import errno
import os

import pytest

import cowdisk
from conftest import MiB


def test_snapshot_create_list_goto_delete(tmp_path, qemu_img):
    path = tmp_path / "s.qcow2"
    cowdisk.create(path, 8 * MiB)
    with cowdisk.open(path) as img:
        assert img.snapshots() == []
        img.pwrite(b"A" * 100_000, 12345)
        first = img.snapshot_create("first", vm_clock_nsec=7_000_000_000)
        assert (first.id, first.name, first.vm_state_size) == ("1", "first", 0)
        assert first.vm_clock_nsec == 7_000_000_000 and first.disk_size == 8 * MiB
        assert first.icount is None and first.date_sec > 1_600_000_000
        img.pwrite(b"B" * 100_000, 12345)
        second = img.snapshot_create("second", icount=99)
        assert second.id == "2" and second.icount == 99
        assert [s.name for s in img.snapshots()] == ["first", "second"]
        assert img.info.nb_snapshots == 2
        img.snapshot_goto("first")
        assert img.pread(100_000, 12345) == b"A" * 100_000
        img.snapshot_goto("2")
        assert img.pread(100_000, 12345) == b"B" * 100_000
        img.snapshot_delete("first")
        with pytest.raises(cowdisk.Error) as e:
            img.snapshot_goto("first")
        assert e.value.errno == errno.ENOENT
    qemu_img.assert_clean(path)
    snaps = qemu_img.info(path)["snapshots"]
    assert [(s["id"], s["name"]) for s in snaps] == [("2", "second")]


def test_vmstate_writer_and_load(tmp_path, qemu_img):
    path = tmp_path / "v.qcow2"
    cowdisk.create(path, 16 * MiB, cluster_size=4096)
    state = os.urandom(3 * MiB + 4321)
    with cowdisk.open(path) as img:
        img.pwrite(b"disk" * 1000, 0)
        with img.vmstate_writer() as w:
            pos = 0
            sizes = [37, 4104, 90, 4104, 1, 65536]
            i = 0
            while pos < len(state):
                n = min(sizes[i % len(sizes)], len(state) - pos)
                assert w.write(state[pos : pos + n]) == n
                pos += n
                i += 1
            assert w.tell() == len(state)
        assert w.closed and w.size == len(state)
        snap = img.snapshot_create("vm", vm_state_size=w.size)
        assert snap.vm_state_size == len(state)
        img.pwrite(b"later" * 1000, 0)
        assert img.load_vmstate(100) == bytes(100), "the active image holds no state"
        img.snapshot_goto("vm")
        assert img.pread(4000, 0) == b"disk" * 1000
        back = b"".join(img.load_vmstate(min(999, len(state) - p), p) for p in range(0, len(state), 999))
        assert back == state
    qemu_img.assert_clean(path)
    assert qemu_img.info(path)["snapshots"][0]["vm-state-size"] == len(state)


def test_snapshot_create_with_vmstate_bytes(tmp_path, qemu_img):
    path = tmp_path / "b.qcow2"
    cowdisk.create(path, 4 * MiB)
    state = os.urandom(200_000)
    with cowdisk.open(path) as img:
        snap = img.snapshot_create("s", vmstate=state)
        assert snap.vm_state_size == len(state)
        img.snapshot_goto(snap.id)
        assert img.load_vmstate(len(state)) == state
        with pytest.raises(ValueError):
            img.snapshot_create("x", vmstate=b"1", vm_state_size=1)
    qemu_img.assert_clean(path)
    r = qemu_img.run("snapshot", "-l", path, check=True)
    assert " s " in r.stdout


def test_qemu_made_snapshots(tmp_path, qemu_img):
    path = tmp_path / "q.qcow2"
    qemu_img.run("create", "-f", "qcow2", path, "4M", check=True)
    with cowdisk.open(path) as img:
        img.pwrite(b"x" * 5000, 0)
    qemu_img.run("snapshot", "-c", "theirs", path, check=True)
    with cowdisk.open(path) as img:
        img.pwrite(b"y" * 5000, 0)
        (snap,) = img.snapshots()
        assert snap.name == "theirs" and snap.icount == 0
        img.snapshot_goto("theirs")
        assert img.pread(5000, 0) == b"x" * 5000
        img.snapshot_delete("theirs")
    qemu_img.assert_clean(path)


def test_read_only_and_closed(tmp_path):
    path = tmp_path / "r.qcow2"
    cowdisk.create(path, MiB)
    with cowdisk.open(path) as img:
        img.snapshot_create("s")
    with cowdisk.open(path, readonly=True) as img:
        assert [s.name for s in img.snapshots()] == ["s"]
        for call in (
            lambda: img.snapshot_create("t"),
            lambda: img.snapshot_delete("s"),
            lambda: img.save_vmstate(b"x", 0),
        ):
            with pytest.raises(cowdisk.Error) as e:
                call()
            assert e.value.errno == errno.EROFS
    w = None
    with cowdisk.open(path) as img:
        w = img.vmstate_writer()
        w.write(b"unfinalized")
    w.close()  # the image's close finalized it already
    with pytest.raises(ValueError):
        img.snapshots()


def test_open_a_snapshot_read_only(tmp_path):
    path = tmp_path / "v.qcow2"
    cowdisk.create(path, 4 * MiB)
    with cowdisk.open(path) as img:
        img.pwrite(b"old" * 1000, 0)
        img.snapshot_create("before")
        img.resize(8 * MiB)
        img.pwrite(b"new" * 1000, 0)
    with cowdisk.open(path, readonly=True, snapshot="before") as snap:
        assert snap.size == 4 * MiB
        assert snap.pread(3000, 0) == b"old" * 1000
    with cowdisk.open(path, readonly=True, snapshot="1") as snap:
        assert snap.pread(3, 0) == b"old"
    with cowdisk.open(path, readonly=True) as img:
        assert img.size == 8 * MiB and img.pread(3, 0) == b"new"
    with pytest.raises(cowdisk.Error) as e:
        cowdisk.open(path, snapshot="before")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(cowdisk.Error) as e:
        cowdisk.open(path, readonly=True, snapshot="nosuch")
    assert e.value.errno == errno.ENOENT and "nosuch" in str(e.value)
