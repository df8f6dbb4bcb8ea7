"""The nbdkit plugin, driven by real NBD clients: qemu-img, qemu-io, nbdinfo,
nbdcopy and nbdsh. Every server listens on a Unix socket in the test's directory.

`make test-nbdkit` sets COWDISK_NBDKIT_PLUGIN (the built plugin) and COWDISK_CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGIN = os.environ.get(
    "COWDISK_NBDKIT_PLUGIN", str(REPO / "build/nbdkit/nbdkit-cowdisk-plugin.so")
)
CLI = os.environ.get("COWDISK_CLI", str(REPO / "target/release/cowdisk"))
MiB = 1 << 20

for tool in ("nbdkit", "nbdinfo", "nbdcopy", "qemu-img", "qemu-io"):
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} is not installed: run `make deps`")
if not Path(PLUGIN).is_file():
    raise RuntimeError(f"{PLUGIN} is missing: run `make plugin`")


def run(*args, check=True, text=True, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=text, **kw)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
        )
    return r


def nbdsh_command() -> list:
    """nbdsh runs `python3 -m nbd`; Debian's module (python3-libnbd) is for the system
    Python, which need not be the first python3 on PATH."""
    for py in ("/usr/bin/python3", shutil.which("python3")):
        if py and subprocess.run([py, "-c", "import nbd"], capture_output=True).returncode == 0:
            return [py, "-m", "nbd"]
    raise RuntimeError("no python3 can import nbd: run `make deps` (python3-libnbd)")


NBDSH = nbdsh_command()


def uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


class Server:
    """nbdkit serving one image with the plugin, in the foreground (or, with
    daemon=True, forked into the background as nbdkit does by default)."""

    def __init__(self, tmp: Path, image: Path, *params: str, daemon=False, verbose=False):
        self.sock = tmp / f"nbd-{random.randrange(1 << 30)}.sock"
        self.pidfile = self.sock.with_suffix(".pid")
        self.log = self.sock.with_suffix(".log")
        args = ["nbdkit", "-U", str(self.sock), "-P", str(self.pidfile)]
        if not daemon:
            args.append("-f")
        if verbose:
            args.append("-v")
        args += [PLUGIN, f"file={image}", *params]
        self.daemon = daemon
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not (self.pidfile.exists() and self.pidfile.read_text().strip()):
            if (not daemon and self.proc.poll() is not None) or time.monotonic() > deadline:
                raise AssertionError(f"nbdkit did not start:\n{self.log.read_text()}")
            time.sleep(0.02)
        self.pid = int(self.pidfile.read_text())
        self.uri = uri(self.sock)

    def stop(self):
        """Stops the server (SIGTERM: nbdkit closes the image, which flushes it)
        and waits until the process is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if not self.daemon:
            self.proc.wait(timeout=60)
        else:
            self.proc.wait(timeout=60)  # the parent, gone since the fork
            deadline = time.monotonic() + 60
            while Path(f"/proc/{self.pid}").exists():
                assert time.monotonic() < deadline, "nbdkit did not exit"
                time.sleep(0.02)

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(image, *params, **kw):
        s = Server(tmp_path, image, *params, **kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def qemu_check(image: Path, *extra: str):
    r = run("qemu-img", "check", "--output=json", *extra, image, check=False)
    assert r.returncode == 0, f"qemu-img check {image}: {r.stdout}{r.stderr}"
    info = json.loads(r.stdout)
    assert info.get("leaks", 0) == 0 and info.get("corruptions", 0) == 0, info


def runs(extents) -> list:
    """(start, length, data, zero) runs, adjacent equal ones merged."""
    out: list = []
    for e in extents:
        key = (bool(e["data"]), bool(e["zero"]))
        if out and out[-1][2:] == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], *key)
        else:
            out.append((e["start"], e["length"], *key))
    return out


def export_map(u: str) -> list:
    return runs(json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", u).stdout))


def nbdinfo_map(u: str) -> list:
    items = json.loads(run("nbdinfo", "--map", "--json", u).stdout)
    # base:allocation: bit 0 hole, bit 1 zero
    return runs(
        {"start": i["offset"], "length": i["length"], "data": not (i["type"] & 1),
         "zero": bool(i["type"] & 2)}
        for i in items
    )


def cowdisk_map(image: Path, *extra: str) -> list:
    return runs(json.loads(run(CLI, "map", "--output=json", *extra, image).stdout))


def pattern_file(path: Path, size: int, seed: int):
    """A raw file with data, zero runs and holes, in 64 KiB pieces."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 64 * 1024):
            kind = rng.randrange(4)
            if kind == 0:
                continue  # hole
            f.seek(off)
            f.write(bytes(64 * 1024) if kind == 1 else rng.randbytes(64 * 1024))


def chain(tmp: Path) -> Path:
    """base <- top: data in both, a compressed cluster, zero clusters, a snapshot."""
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "32M")
    run("qemu-io", "-c", "write -P 0x11 0 4M", "-c", "write -P 0x12 8M 2M", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    run("qemu-io", "-c", "write -P 0x21 1M 1M", "-c", "write -z 2M 512k",
        "-c", "write -c -P 0x22 12M 64k", "-c", "write -P 0x23 4097 3000",
        "-c", "write -z 8M 64k", top)
    return top


def test_export_reads_what_cowdisk_reads(tmp_path, serve):
    top = chain(tmp_path)
    s = serve(top, "readonly=true")
    got, want = tmp_path / "export.raw", tmp_path / "cowdisk.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri, got)
    run(CLI, "read", top, 0, 32 * MiB, "--to", want)
    assert got.read_bytes() == want.read_bytes()
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", got, top)
    # Block status through the export is what the image's map says.
    assert export_map(s.uri) == cowdisk_map(top) == nbdinfo_map(s.uri)
    info = json.loads(run("nbdinfo", "--json", s.uri).stdout)["exports"][0]
    assert info["export-size"] == 32 * MiB
    assert info["is_read_only"] is True and info["can_multi_conn"] is True


QEMU_IO_SCRIPT = [
    "write -P 0x11 0 4M",
    "write -z 1M 1M",          # zero clusters, host clusters kept
    "write -z -u 2M 1M",       # may unmap: host clusters released
    "discard 3M 512k",
    "write -f -P 0x22 5M 64k",  # FUA
    "write -P 0x33 4097 5000",  # unaligned
    "write -z 6M 100k",        # zeroes not covering whole clusters
    "flush",
]


def test_qemu_io_writes_land_in_the_image(tmp_path, serve):
    img, model = tmp_path / "img.qcow2", tmp_path / "model.raw"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
    run("qemu-img", "create", "-q", "-f", "raw", model, "16M")
    s = serve(img, verbose=True)
    args = [a for c in QEMU_IO_SCRIPT for a in ("-c", c)]
    run("qemu-io", "-f", "raw", *args, s.uri)
    run("qemu-io", "-f", "raw", *args, model)
    assert export_map(s.uri) == cowdisk_map(img, "-U") == nbdinfo_map(s.uri)
    s.stop()
    assert "cowdisk: FUA: flushing" in s.output()
    qemu_check(img)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, model)
    # Zeroes that may unmap released their host clusters; plain ones kept theirs.
    ext = json.loads(run("qemu-img", "map", "--output=json", img).stdout)
    at = {e["start"]: e for e in ext}
    assert at[1 * MiB]["zero"] and "offset" in at[1 * MiB], at[1 * MiB]
    unmapped = next(e for e in ext if e["start"] <= 2 * MiB < e["start"] + e["length"])
    assert unmapped["zero"] and "offset" not in unmapped, unmapped


def test_nbdcopy_with_four_connections(tmp_path, serve):
    img, src, back = tmp_path / "img.qcow2", tmp_path / "src.raw", tmp_path / "back.raw"
    size = 48 * MiB
    pattern_file(src, size, seed=7)
    run("qemu-img", "create", "-q", "-f", "qcow2", img, str(size))
    s = serve(img)
    run("nbdcopy", "--connections=4", "--requests=16", src, s.uri)
    run("nbdcopy", "--connections=4", "--requests=16", s.uri, back)
    assert back.read_bytes() == src.read_bytes()
    s.stop()
    qemu_check(img)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, src)


def test_parallel_writers_lose_nothing(tmp_path, serve):
    img = tmp_path / "img.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
    s = serve(img)
    writers = []
    chunk = 16 * 1024  # four writers interleave inside every 64 KiB cluster
    for w in range(4):
        cmds = [a for i in range(w, 16 * MiB // chunk, 4)
                for a in ("-c", f"write -P {0x41 + w} {i * chunk} {chunk}")]
        writers.append(subprocess.Popen(["qemu-io", "-f", "raw", *cmds, s.uri],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for p in writers:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    s.stop()
    qemu_check(img)
    data = run(CLI, "read", img, 0, "64k", "--to", "-", text=False).stdout
    assert data == b"".join(bytes([0x41 + (i % 4)]) * chunk for i in range(4))
    full = subprocess.run([CLI, "read", img, "0", "16M", "--to", "-"],
                          capture_output=True, check=True).stdout
    for i in range(16 * MiB // chunk):
        piece = full[i * chunk:(i + 1) * chunk]
        assert piece == bytes([0x41 + i % 4]) * chunk, f"chunk {i} lost"


def test_readonly_export_refuses_writes(tmp_path, serve):
    img = chain(tmp_path)
    before = run(CLI, "read", img, 0, "1M", "--to", "-", text=False).stdout
    s = serve(img, "readonly=true")
    info = json.loads(run("nbdinfo", "--json", s.uri).stdout)["exports"][0]
    assert info["is_read_only"] is True
    r = run(*NBDSH, "-u", s.uri, "-c",
            "try:\n h.pwrite(b'x' * 512, 0)\nexcept nbd.Error as e:\n print('refused', e.errno)",
            check=False)
    assert "refused" in r.stdout, r.stdout + r.stderr
    r = run("qemu-io", "-f", "raw", "-c", "write 0 4k", s.uri, check=False)
    assert r.returncode != 0 or "failed" in (r.stdout + r.stderr).lower(), r
    # A read-only open shares the image with other readers, as QEMU's does.
    run("qemu-img", "info", img)
    s.stop()
    assert run(CLI, "read", img, 0, "1M", "--to", "-", text=False).stdout == before


def test_snapshot_export(tmp_path, serve):
    img = chain(tmp_path)
    run("qemu-img", "snapshot", "-c", "before", img)
    run("qemu-io", "-c", "write -P 0x77 0 2M", img)
    s = serve(img, "snapshot=before")
    got, want = tmp_path / "snap.raw", tmp_path / "want.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", s.uri, got)
    run("qemu-img", "convert", "-l", "snapshot.name=before", "-O", "raw", img, want)
    assert got.read_bytes() == want.read_bytes()
    r = run("nbdkit", "-U", tmp_path / "x.sock", PLUGIN, f"file={img}", "snapshot=nosuch",
            "--run", "true", check=False)
    assert r.returncode != 0 and "nosuch" in r.stderr, r.stderr
    r = run("nbdkit", "-U", tmp_path / "x.sock", PLUGIN, f"file={img}", "snapshot=before",
            "readonly=false", "--run", "true", check=False)
    assert r.returncode != 0 and "read-only" in r.stderr, r.stderr


def start_fails(tmp_path, *params) -> str:
    """Starts nbdkit as a user would (forking into the background) and returns its
    error output; it must fail before forking."""
    sock = tmp_path / "fail.sock"
    r = run("nbdkit", "-U", sock, PLUGIN, *params, check=False, timeout=60)
    assert r.returncode != 0, f"nbdkit started with {params}: {r.stderr}"
    assert not sock.exists()
    return r.stderr


def test_startup_failures_carry_cowdisk_messages(tmp_path):
    missing = tmp_path / "missing.qcow2"
    err = start_fails(tmp_path, f"file={missing}")
    assert str(missing) in err and "No such file" in err, err

    enc = tmp_path / "enc.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=right",
        "-o", "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10", enc, "8M")
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong")
    err = start_fails(tmp_path, f"file={enc}", f"secret-file={wrong}")
    assert "passphrase opens none" in err and str(enc) in err, err
    err = start_fails(tmp_path, f"file={enc}")
    assert "passphrase is needed" in err, err

    bad = tmp_path / "bad.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", bad, "8M")
    with open(bad, "r+b") as f:  # the L1 table offset, far past the end of the file
        f.seek(40)
        f.write((1 << 40).to_bytes(8, "big"))
    err = start_fails(tmp_path, f"file={bad}")
    assert "L1 table" in err and "outside the file" in err, err

    err = start_fails(tmp_path, f"file={bad}", "bogus=1")
    assert "unknown parameter 'bogus'" in err, err


def test_encrypted_image_served_from_a_forked_daemon(tmp_path, serve):
    """nbdkit forks into the background after the plugin opened the image: the
    child must start its own crypto workers (the parent's threads are not in it)."""
    enc = tmp_path / "enc.qcow2"
    secret = tmp_path / "secret"
    secret.write_text("pw")
    run("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=pw",
        "-o", "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10", enc, "16M")
    src, back = tmp_path / "src.raw", tmp_path / "back.raw"
    pattern_file(src, 16 * MiB, seed=3)
    s = serve(enc, f"secret-file={secret}", daemon=True)
    assert s.proc.wait(timeout=30) == 0  # the parent returned once the child served
    run("nbdcopy", "--connections=2", src, s.uri)
    run("nbdcopy", s.uri, back)
    assert back.read_bytes() == src.read_bytes()
    if (os.cpu_count() or 1) > 1:
        names = {p.read_text().strip() for p in Path(f"/proc/{s.pid}/task").glob("*/comm")}
        assert any(n.startswith("cowdisk-crypto") for n in names), names
    s.stop()
    opts = "driver=qcow2,file.filename={},encrypt.key-secret=s".format(enc)
    r = run("qemu-img", "compare", "--object", "secret,id=s,data=pw", "--image-opts",
            opts, "driver=raw,file.filename={}".format(src))
    assert "identical" in r.stdout
    r = run("qemu-img", "check", "--object", "secret,id=s,data=pw", "--image-opts", opts)
    assert "No errors were found" in r.stdout, r.stdout


NBDSH_ZERO = """
import errno
try:
    h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
    print("fast-zero ok")
except nbd.Error as e:
    print("fast-zero refused", e.errno)
h.zero(65536, 65536)
print("zero ok")
"""


def test_fast_zero_is_truthful(tmp_path, serve):
    v3 = tmp_path / "v3.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", v3, "8M")
    s = serve(v3)
    r = run(*NBDSH, "-u", s.uri, "-c", NBDSH_ZERO)
    assert "fast-zero ok" in r.stdout and "zero ok" in r.stdout, r.stdout

    # A v2 image over a backing file has no zero clusters: zeros are data there.
    base, v2 = tmp_path / "base.qcow2", tmp_path / "v2.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
    run("qemu-io", "-c", "write -P 0x55 0 1M", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", base,
        "-F", "qcow2", v2)
    s2 = serve(v2)
    r = run(*NBDSH, "-u", s2.uri, "-c", NBDSH_ZERO)
    assert ("fast-zero refused ENOTSUP" in r.stdout or "fast-zero refused 95" in r.stdout) \
        and "zero ok" in r.stdout, r.stdout
    s2.stop()
    run("qemu-io", "-r", "-c", "read -P 0x55 0 64k", "-c", "read -P 0 64k 64k", v2)
    qemu_check(v2)


NBDSH_EXTENTS = """
seen = []
def cb(meta, offset, entries, err):
    seen.append((offset, list(entries)))
h.block_status(8 << 20, 0, cb, nbd.CMD_FLAG_REQ_ONE)
print(json.dumps(seen))
h.cache(4 << 20, 0)
print("cache ok")
"""


def test_req_one_extents_and_cache(tmp_path, serve):
    top = chain(tmp_path)
    s = serve(top, "readonly=true")
    r = run(*NBDSH, "--base-allocation", "-u", s.uri, "-c", "import json\n" + NBDSH_EXTENTS)
    lines = r.stdout.splitlines()
    seen = json.loads(lines[0])
    assert len(seen) == 1 and len(seen[0][1]) == 2, seen  # one (length, flags) pair
    length, flags = seen[0][1]
    first = cowdisk_map(top)[0]
    assert length <= 8 * MiB and length <= first[1] and flags == 0  # data from base
    assert lines[1] == "cache ok"


def test_full_filesystem_is_enospc(tmp_path, serve):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if run("mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", mnt, check=False).returncode:
        pytest.skip("cannot mount a small tmpfs here (not root?)")
    try:
        img, filler = mnt / "img.qcow2", mnt / "filler"
        run("qemu-img", "create", "-q", "-f", "qcow2", img, "32M")
        filler.write_bytes(b"f" * (3 * MiB))
        src = tmp_path / "src.raw"
        src.write_bytes(random.Random(1).randbytes(16 * MiB))
        s = serve(img)
        r = run("nbdcopy", src, s.uri, check=False)
        assert r.returncode != 0
        assert "No space left on device" in (r.stderr + s.output()), r.stderr + s.output()
        # Once space is back, the same server (the same handle) writes again.
        filler.unlink()
        run("qemu-io", "-f", "raw", "-c", "write -P 0x66 0 1M", "-c", "flush", s.uri)
        s.stop()
        qemu_check(img)
        run("qemu-io", "-r", "-c", "read -P 0x66 0 1M", img)
    finally:
        run("umount", mnt, check=False)
