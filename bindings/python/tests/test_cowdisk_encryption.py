"""Encrypted images through the binding: ``secret=``, ``encrypt_format=``, metadata-only
opens, and QEMU reading what the binding wrote."""

from __future__ import annotations

import errno
import random

import pytest

import cowdisk

from conftest import MiB

PASS = "binding passphrase"


def _qemu_opts(path):
    return [
        "--object", f"secret,id=s0,data={PASS}", "--image-opts",
        f"driver=qcow2,file.filename={path},encrypt.key-secret=s0",
    ]


@pytest.mark.parametrize(
    "kw",
    [
        {"encrypt_format": "luks"},
        {"encrypt_format": "luks", "cipher_alg": "aes-128", "cipher_mode": "cbc",
         "ivgen_alg": "essiv", "hash_alg": "sha1"},
        {"encrypt_format": "aes"},
    ],
    ids=["luks-default", "luks-aes128-cbc-essiv", "legacy-aes"],
)
def test_create_write_and_qemu_reads(tmp_path, qemu_img, kw):
    path = tmp_path / "enc.qcow2"
    cowdisk.create(path, 4 * MiB, secret=PASS.encode(), iter_time=10, **kw)
    rng = random.Random(3)
    model = bytearray(4 * MiB)
    with cowdisk.open(path, secret=PASS) as img:
        assert img.info.encrypt_format == kw["encrypt_format"]
        for _ in range(20):
            off = rng.randrange(4 * MiB - 100_000)
            data = rng.randbytes(rng.randrange(1, 100_000))
            img.pwrite(data, off)
            model[off : off + len(data)] = data
        assert img.pread(4 * MiB, 0) == bytes(model)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    r = qemu_img.run("compare", *_qemu_opts(path), f"driver=raw,file.filename={raw}")
    assert r.returncode == 0, r.stdout + r.stderr
    r = qemu_img.run("check", *_qemu_opts(path))
    assert r.returncode == 0, r.stdout + r.stderr
    if kw["encrypt_format"] == "luks":
        enc = qemu_img.info(path)["format-specific"]["data"]["encrypt"]
        assert enc["cipher-alg"] == kw.get("cipher_alg", "aes-256")
        assert enc["cipher-mode"] == kw.get("cipher_mode", "xts")


def test_keys_and_metadata_only(tmp_path):
    path = tmp_path / "k.qcow2"
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.create(path, MiB, encrypt_format="luks")
    assert exc.value.errno == errno.ENOKEY
    cowdisk.create(path, MiB, encrypt_format="luks", secret=PASS, iter_time=10)
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.open(path)
    assert exc.value.errno == errno.ENOKEY
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.open(path, secret=b"nope")
    assert exc.value.errno == errno.EKEYREJECTED
    with cowdisk.open(path, readonly=True, metadata_only=True) as img:
        assert img.info.encrypt_format == "luks"
        assert img.check().clean
        with pytest.raises(cowdisk.Error) as exc:
            img.pread(512, 0)
        assert exc.value.errno == errno.ENOKEY
    with cowdisk.open(path, secret=PASS) as img:
        with pytest.raises(cowdisk.Error) as exc:
            img.pwrite_compressed(bytes(65536), 0)
        assert exc.value.errno == errno.ENOTSUP
    with pytest.raises(ValueError):
        cowdisk.create(tmp_path / "x.qcow2", MiB, encrypt_format="rot13", secret=PASS)


def test_convert_into_and_out_of_encryption(tmp_path, new_image):
    plain = new_image(2 * MiB)
    data = random.Random(4).randbytes(300_000)
    with cowdisk.open(plain) as img:
        img.pwrite(data, 12345)
    enc = tmp_path / "enc.qcow2"
    cowdisk.convert(plain, enc, encrypt_format="luks", target_secret=PASS, iter_time=10)
    back = tmp_path / "back.raw"
    cowdisk.convert(enc, back, target_format="raw", secret=PASS)
    raw = back.read_bytes()
    assert raw[12345 : 12345 + len(data)] == data and len(raw) == 2 * MiB
    with pytest.raises(cowdisk.Error) as exc:
        cowdisk.convert(enc, tmp_path / "nokey.raw", target_format="raw")
    assert exc.value.errno == errno.ENOKEY
