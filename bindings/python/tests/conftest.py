"""Shared fixtures for the cowdisk Python binding tests.

Makes ``import cowdisk`` work from any working directory by putting the package's parent
directory first on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PYTHON_DIR = Path(__file__).resolve().parents[1]  # <repo>/bindings/python
REPO = PYTHON_DIR.parents[1]
if str(PYTHON_DIR) not in sys.path:
    sys.path.insert(0, str(PYTHON_DIR))

import cowdisk  # noqa: E402

# random.Random.randbytes is Python 3.9+; the tests use it on 3.8 too (same bytes).
if not hasattr(random.Random, "randbytes"):

    def _randbytes(self, n: int) -> bytes:
        return self.getrandbits(n * 8).to_bytes(n, "little") if n else b""

    random.Random.randbytes = _randbytes

MiB = 1 << 20


class QemuImg:
    """Small wrapper over the ``qemu-img`` tool used as an independent oracle."""

    def __init__(self, exe: str):
        self.exe = exe

    def run(self, *args, check=False) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.exe, *map(str, args)], capture_output=True, text=True, check=check
        )

    def info(self, path) -> dict:
        out = self.run("info", "--output=json", path, check=True).stdout
        return json.loads(out)

    def assert_clean(self, path) -> None:
        r = self.run("check", path)
        assert r.returncode == 0, f"qemu-img check {path}: rc={r.returncode}\n{r.stdout}{r.stderr}"
        assert "No errors were found" in r.stdout, r.stdout

    def assert_same_as_raw(self, image, raw_bytes: bytes, tmp_path: Path) -> None:
        raw = tmp_path / "expected.raw"
        raw.write_bytes(raw_bytes)
        r = self.run("compare", "-f", "qcow2", "-F", "raw", image, raw)
        assert r.returncode == 0, f"qemu-img compare: rc={r.returncode}\n{r.stdout}{r.stderr}"


@pytest.fixture(scope="session")
def qemu_img() -> QemuImg:
    exe = shutil.which("qemu-img")
    if exe is None:
        pytest.skip("qemu-img is not installed")
    return QemuImg(exe)


@pytest.fixture
def new_image(tmp_path):
    """Factory: creates an image with cowdisk.create and returns its path."""
    counter = iter(range(1_000_000))

    def make(size=4 * MiB, name=None, **opts) -> Path:
        path = tmp_path / (name or f"img{next(counter)}.qcow2")
        cowdisk.create(path, size, **opts)
        return path

    return make


@pytest.fixture
def clean_env():
    """The environment for child Pythons, without COWDISK_LIB."""
    env = dict(os.environ)
    env.pop("COWDISK_LIB", None)
    env.pop("PYTHONPATH", None)
    return env
