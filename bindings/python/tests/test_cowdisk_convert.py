"""The copy engine through the binding: ``convert``, ``compare``, ``commit``, ``rebase``."""

from __future__ import annotations

import errno
import random
import shutil
import subprocess
import threading

import pytest

import cowdisk

from conftest import MiB

SIZE = 8 * MiB


def _fill(path) -> bytes:
    """Writes data, text, zeros-as-data and holes into the image; returns what it reads."""
    rng = random.Random(12)
    model = bytearray(SIZE)
    with cowdisk.open(path) as img:
        for off, chunk in (
            (0, rng.randbytes(300_000)),
            (1 * MiB + 7, b"text that compresses well. " * 5000),
            (3 * MiB, bytes(256 * 1024)),  # zeros written as data
            (5 * MiB - 512, rng.randbytes(4096)),
            (SIZE - 1000, rng.randbytes(1000)),
        ):
            img.pwrite(chunk, off)
            model[off : off + len(chunk)] = chunk
    return bytes(model)


def _read_all(path, **kw) -> bytes:
    with cowdisk.open(path, readonly=True, **kw) as img:
        return img.pread(img.size, 0)


@pytest.fixture
def source(new_image):
    path = new_image(SIZE)
    return path, _fill(path)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"cluster_size": 4096, "version": 2},
        {"compressed": True},
        {"compressed": True, "compression_type": "zstd"},
        {"out_of_order": True, "workers": 3},
        {"min_sparse": None},
    ],
    ids=["default", "v2-4k", "zlib", "zstd", "W-m3", "S0"],
)
def test_convert_to_qcow2_is_identical_and_clean(source, tmp_path, qemu_img, kw):
    src, model = source
    dst = tmp_path / "out.qcow2"
    cowdisk.convert(src, dst, **kw)
    qemu_img.assert_clean(dst)
    r = qemu_img.run("compare", src, dst)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _read_all(dst) == model
    info = qemu_img.info(dst)
    if "cluster_size" in kw:
        assert info["cluster-size"] == kw["cluster_size"]
        assert info["format-specific"]["data"]["compat"] == "0.10"
    if kw.get("compressed"):
        with cowdisk.open(dst, readonly=True) as img:
            assert any(e.compressed for e in img.map())
        kind = kw.get("compression_type", "zlib")
        assert info["format-specific"]["data"]["compression-type"] == kind


def test_convert_raw_both_ways(source, tmp_path, qemu_img):
    src, model = source
    raw = tmp_path / "out.raw"
    cowdisk.convert(src, raw, target_format="raw")
    assert raw.read_bytes() == model
    back = tmp_path / "back.qcow2"
    cowdisk.convert(raw, back, source_format="raw")
    assert _read_all(back) == model
    qemu_img.assert_clean(back)
    assert cowdisk.compare(raw, back, a_format="raw")


def test_convert_progress_is_monotone_and_complete(source, tmp_path):
    src, _ = source
    seen = []
    tid = []

    def progress(done, total):
        seen.append((done, total))
        tid.append(threading.get_ident())

    cowdisk.convert(src, tmp_path / "out.qcow2", progress=progress, workers=2)
    assert len(seen) >= 2
    total = seen[0][1]
    assert total > 0 and all(t == total for _, t in seen)
    dones = [d for d, _ in seen]
    assert dones == sorted(dones) and dones[0] == 0 and dones[-1] == total
    assert set(tid) == {threading.get_ident()}  # on the calling thread


def test_convert_cancel_by_returning_false(source, tmp_path):
    src, _ = source
    dst = tmp_path / "out.qcow2"
    with pytest.raises(cowdisk.Error) as ei:
        cowdisk.convert(src, dst, progress=lambda done, total: False)
    assert ei.value.errno == errno.ECANCELED
    assert not dst.exists()


def test_convert_exception_in_progress_propagates(source, tmp_path):
    src, _ = source
    dst = tmp_path / "out.qcow2"
    calls = []

    def progress(done, total):
        # The first call (done == 0) always comes before the copy is complete.
        calls.append(done)
        raise KeyError("stop here")

    with pytest.raises(KeyError, match="stop here"):
        cowdisk.convert(src, dst, progress=progress)
    assert calls == [0]  # never called again after the exception
    assert not dst.exists()


def test_convert_existing_target_and_backing(source, tmp_path, qemu_img, new_image):
    src, model = source
    # -n into an existing, larger image: the source's content lands, the rest stays.
    dst = new_image(SIZE + MiB, name="existing.qcow2")
    with cowdisk.open(dst) as img:
        img.pwrite(b"\xee" * 4096, SIZE)
    cowdisk.convert(src, dst, existing=True)
    got = _read_all(dst)
    assert got[:SIZE] == model and got[SIZE : SIZE + 4096] == b"\xee" * 4096
    # -B: of a source with a backing chain, only what lies above that base is copied.
    base = tmp_path / "base.qcow2"
    cowdisk.convert(src, base)
    over = tmp_path / "over.qcow2"
    cowdisk.create(over, SIZE, backing_file="base.qcow2", backing_format="qcow2")
    with cowdisk.open(over) as img:
        img.pwrite(b"changed", 2 * MiB)
    model = model[: 2 * MiB] + b"changed" + model[2 * MiB + 7 :]
    top = tmp_path / "top.qcow2"
    cowdisk.convert(over, top, backing_file="base.qcow2", backing_format="qcow2")
    assert _read_all(top) == model
    with cowdisk.open(top, readonly=True) as img:
        own = sum(e.length for e in img.map() if e.data and e.depth == 0)
    assert own == 64 * 1024  # the one changed cluster, not the whole disk
    qemu_img.assert_clean(top)


def test_convert_snapshot(source, tmp_path):
    src, model = source
    with cowdisk.open(src) as img:
        img.snapshot_create("before")
        img.pwrite(b"after" * 1000, 0)
    dst = tmp_path / "snap.qcow2"
    cowdisk.convert(src, dst, snapshot="before")
    assert _read_all(dst) == model
    with pytest.raises(cowdisk.Error) as ei:
        cowdisk.convert(src, tmp_path / "none.qcow2", snapshot="no-such")
    assert ei.value.errno in (errno.ENOENT, errno.EINVAL)


def test_convert_errors(tmp_path, source):
    src, _ = source
    with pytest.raises(cowdisk.Error) as ei:
        cowdisk.convert(tmp_path / "missing.qcow2", tmp_path / "out.qcow2")
    assert ei.value.errno == errno.ENOENT
    assert ei.value.filename.endswith("missing.qcow2")
    assert not (tmp_path / "out.qcow2").exists()
    with pytest.raises(ValueError):
        cowdisk.convert(src, tmp_path / "x", target_format="vmdk")
    with pytest.raises(cowdisk.Error) as ei:
        cowdisk.convert(src, tmp_path / "x", workers=17)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(cowdisk.Error) as ei:
        cowdisk.convert(src, tmp_path / "x", cluster_size=3000)
    assert ei.value.errno == errno.EINVAL


def test_compare_finds_one_byte(source, tmp_path):
    src, model = source
    raw = tmp_path / "copy.raw"
    raw.write_bytes(model)
    same = cowdisk.compare(src, raw, b_format="raw")
    assert same and same.identical and same.offset is None
    for at in (0, 4 * MiB + 12345, SIZE - 1):
        flipped = bytearray(model)
        flipped[at] ^= 0x40
        raw.write_bytes(flipped)
        r = cowdisk.compare(src, raw, b_format="raw")
        assert not r and r.offset == at - at % 512
    # A size difference: equal unless strict, and an extra non-zero byte differs.
    raw.write_bytes(model + bytes(4096))
    assert cowdisk.compare(src, raw, b_format="raw")
    r = cowdisk.compare(src, raw, b_format="raw", strict=True)
    assert not r and r.offset == SIZE
    raw.write_bytes(model + bytes(100) + b"\x01")
    r = cowdisk.compare(src, raw, b_format="raw")
    assert not r and r.offset == SIZE


def _chain(tmp_path, qemu_img):
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    cowdisk.create(base, SIZE)
    cowdisk.create(top, SIZE, backing_file="base.qcow2", backing_format="qcow2")
    model = bytearray(SIZE)
    with cowdisk.open(base) as img:
        img.pwrite(b"\x11" * MiB, 0)
        model[:MiB] = b"\x11" * MiB
    with cowdisk.open(top) as img:
        img.pwrite(b"\x22" * 70000, 500_000)
        model[500_000:570_000] = b"\x22" * 70000
        img.pwrite(b"\x33" * 4096, 6 * MiB)
        model[6 * MiB : 6 * MiB + 4096] = b"\x33" * 4096
    return base, top, bytes(model)


def test_commit_into_backing_file(tmp_path, qemu_img):
    base, top, model = _chain(tmp_path, qemu_img)
    seen = []
    cowdisk.commit(top, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1]
    assert _read_all(base) == model
    assert _read_all(top) == model
    with cowdisk.open(top, readonly=True) as img:
        assert not any(e.data and e.depth == 0 for e in img.map())  # emptied
    qemu_img.assert_clean(base)
    qemu_img.assert_clean(top)


def test_commit_keep_and_errors(tmp_path, qemu_img):
    base, top, model = _chain(tmp_path, qemu_img)
    cowdisk.commit(top, keep=True)
    assert _read_all(base) == model
    with cowdisk.open(top, readonly=True) as img:
        assert any(e.data and e.depth == 0 for e in img.map())  # kept
    with pytest.raises(cowdisk.Error) as ei:
        cowdisk.commit(base)  # no backing file
    assert ei.value.errno == errno.EINVAL


def test_rebase_safe_and_unsafe(tmp_path, qemu_img):
    base, top, model = _chain(tmp_path, qemu_img)
    cowdisk.rebase(top, None)
    assert qemu_img.info(top).get("backing-filename") is None
    base.unlink()
    assert _read_all(top) == model
    qemu_img.assert_clean(top)
    # -u only renames: the image now names a file that does not exist.
    cowdisk.rebase(top, "elsewhere.qcow2", backing_format="qcow2", unsafe=True)
    assert qemu_img.info(top)["backing-filename"] == "elsewhere.qcow2"
    with pytest.raises(cowdisk.Error) as ei:
        cowdisk.open(top, readonly=True)
    assert ei.value.errno == errno.ENOENT


def test_rebase_cancel_keeps_old_backing(tmp_path, qemu_img):
    base, top, model = _chain(tmp_path, qemu_img)
    with pytest.raises(cowdisk.Error) as ei:
        cowdisk.rebase(top, "", progress=lambda d, t: False)
    assert ei.value.errno == errno.ECANCELED
    assert qemu_img.info(top)["backing-filename"] == "base.qcow2"
    assert _read_all(top) == model


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io is not installed")
def test_convert_of_qemu_made_chain_matches_qemu(tmp_path, qemu_img):
    base = tmp_path / "qbase.raw"
    mid = tmp_path / "qmid.qcow2"
    top = tmp_path / "qtop.qcow2"
    qemu_img.run("create", "-f", "raw", base, SIZE, check=True)
    qemu_img.run("create", "-f", "qcow2", "-b", base, "-F", "raw", mid, check=True)
    qemu_img.run("create", "-f", "qcow2", "-b", mid, "-F", "qcow2", top, "-o",
                 "cluster_size=4096", check=True)
    for img, cmds in (
        (base, ["write -P 1 0 1M"]),
        (mid, ["write -P 2 512k 1M", "write -z 3M 64k"]),
        (top, ["write -P 3 700k 8k", "write -c -P 4 6M 64k"]),
    ):
        fmt = "raw" if img == base else "qcow2"
        for c in cmds:
            subprocess.run(["qemu-io", "-f", fmt, "-c", c, str(img)], check=True,
                           capture_output=True)
    for kw, name in (({}, "c.qcow2"), ({"target_format": "raw"}, "c.raw"),
                     ({"compressed": True}, "cz.qcow2")):
        out = tmp_path / name
        cowdisk.convert(top, out, **kw)
        fmt = "raw" if name.endswith(".raw") else "qcow2"
        r = qemu_img.run("compare", "-F", fmt, top, out)
        assert r.returncode == 0, r.stdout + r.stderr
        if fmt == "qcow2":
            qemu_img.assert_clean(out)
