"""``create``, ``open`` and the ``Image`` handle."""

from __future__ import annotations

import ctypes
import operator
import os
import threading
import warnings
from collections.abc import Iterator

from . import _native
from ._bitmap import BitmapInfo, DirtyExtent
from ._buffer import Pinned
from ._compat import frozen_dataclass
from ._errors import check, invalid
from ._errors import check as _check_rc
from ._snapshot import Snapshot, VMStateWriter

_lib = _native.lib

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1

_COMPRESSION_BY_NAME = {"zlib": _native.COMPRESSION_ZLIB, "zstd": _native.COMPRESSION_ZSTD}
_COMPRESSION_BY_CODE = {v: k for k, v in _COMPRESSION_BY_NAME.items()}
_ENCRYPT_BY_NAME = {"aes": _native.ENCRYPT_AES, "luks": _native.ENCRYPT_LUKS}
_ENCRYPT_BY_CODE = {v: k for k, v in _ENCRYPT_BY_NAME.items()}


class _SecretBuffer:
    """A passphrase copied into a ctypes buffer that is wiped once the C call that
    borrows it has returned (Python ``bytes``/``str`` cannot be wiped; keep their
    lifetime short on your side)."""

    def __init__(self, secret):
        if secret is None:
            self.buf, self.len = None, 0
            return
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        data = bytes(memoryview(secret))
        self.len = len(data)
        self.buf = ctypes.create_string_buffer(data, max(self.len, 1))
        del data

    def attach(self, opts) -> None:
        """Points ``opts.secret``/``opts.secret_len`` at the buffer."""
        if self.buf is not None:
            opts.secret = ctypes.cast(self.buf, ctypes.c_void_p)
            opts.secret_len = self.len

    def wipe(self) -> None:
        if self.buf is not None:
            ctypes.memset(self.buf, 0, ctypes.sizeof(self.buf))
            self.buf = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.wipe()


# --- argument conversion ------------------------------------------------------------------


def _path_bytes(path) -> bytes:
    raw = os.fsencode(os.fspath(path))
    if b"\0" in raw:
        raise ValueError("embedded null byte in path")
    return raw


def _uint(value, name: str, maximum: int, filename=None) -> int:
    value = operator.index(value)
    if not 0 <= value <= maximum:
        raise invalid(f"{name} out of range: {value}", filename)
    return value


def _bitmap_name(name, what: str = "bitmap name") -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    raw = name.encode("utf-8")
    if b"\0" in raw:
        raise ValueError(f"embedded null byte in {what}")
    return raw


def _length(value) -> int:
    value = operator.index(value)
    if value < 0:
        raise ValueError(f"length must be non-negative, not {value}")
    return value


# --- info ---------------------------------------------------------------------------------


@frozen_dataclass
class ImageInfo:
    """Facts about an open image, as returned by :attr:`Image.info`.

    Attributes:
        version: qcow2 version, 2 or 3.
        virtual_size: guest-visible size in bytes.
        cluster_size: cluster size in bytes.
        refcount_bits: refcount width in bits.
        read_only: the handle was opened read-only.
        lazy_refcounts: the image has lazy refcounts enabled.
        dirty: the image's dirty bit is set.
        corrupt: the image is marked corrupt.
        compression_type: ``"zlib"`` or ``"zstd"``.
        nb_snapshots: number of internal snapshots.
        backing_depth: number of opened backing images below this one.
        host_size: bytes of the image file in use (end of the last cluster allocated;
            the file may be longer while space is preallocated ahead).
        backing_file: backing file name stored in the image, or ``None``.
        backing_format: backing format stored in the image, or ``None``.
        encrypt_format: ``"luks"``, ``"aes"`` (legacy) or ``None`` when the image is
            not encrypted.
    """

    version: int
    virtual_size: int
    cluster_size: int
    refcount_bits: int
    read_only: bool
    lazy_refcounts: bool
    dirty: bool
    corrupt: bool
    compression_type: str
    nb_snapshots: int
    backing_depth: int
    host_size: int
    backing_file: str | None
    backing_format: str | None
    encrypt_format: str | None

    @classmethod
    def _from_c(cls, s: _native.Info) -> "ImageInfo":
        def text(raw: bytes) -> str | None:
            return os.fsdecode(raw) if raw else None

        return cls(
            version=s.version,
            virtual_size=s.virtual_size,
            cluster_size=s.cluster_size,
            refcount_bits=s.refcount_bits,
            read_only=bool(s.flags & _native.INFO_READONLY),
            lazy_refcounts=bool(s.flags & _native.INFO_LAZY_REFCOUNTS),
            dirty=bool(s.flags & _native.INFO_DIRTY),
            corrupt=bool(s.flags & _native.INFO_CORRUPT),
            compression_type=_COMPRESSION_BY_CODE.get(
                s.compression_type, f"unknown({s.compression_type})"
            ),
            nb_snapshots=s.nb_snapshots,
            backing_depth=s.backing_depth,
            host_size=s.host_size,
            backing_file=text(s.backing_file),
            backing_format=text(s.backing_format),
            encrypt_format=_ENCRYPT_BY_CODE.get(s.encrypt_format),
        )


# --- block status -------------------------------------------------------------------------

# Extents fetched per cowdisk_block_status call.
_EXTENT_BATCH = 1024


@frozen_dataclass
class CheckResult:
    """What :meth:`Image.check` found, with ``qemu-img check``'s meaning of each count."""

    corruptions: int
    leaks: int
    check_errors: int
    corruptions_fixed: int
    leaks_fixed: int
    image_end_offset: int
    total_clusters: int
    allocated_clusters: int
    fragmented_clusters: int
    compressed_clusters: int

    @property
    def clean(self) -> bool:
        """No corruption, no leak, no check error."""
        return self.corruptions == 0 and self.leaks == 0 and self.check_errors == 0


@frozen_dataclass
class Extent:
    """A run of guest bytes with the same status, as listed by :meth:`Image.map`.

    The fields mean what they mean in ``qemu-img map --output=json``.

    Attributes:
        start: guest offset of the first byte.
        length: length in bytes.
        depth: layer of the backing chain that decides the bytes (0 = this image).
        present: some layer allocates the bytes (as data or as zeros).
        zero: the bytes read as zeros.
        data: the bytes are stored as data.
        compressed: the bytes are in a compressed cluster.
        offset: host offset of the first byte in the file of layer ``depth``, or
            ``None`` when there is none (unallocated, zero or compressed clusters).
    """

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    compressed: bool
    offset: int | None

    @classmethod
    def _from_c(cls, e: _native.Extent) -> "Extent":
        return cls(
            start=e.start,
            length=e.length,
            depth=e.depth,
            present=bool(e.flags & _native.EXTENT_PRESENT),
            zero=bool(e.flags & _native.EXTENT_ZERO),
            data=bool(e.flags & _native.EXTENT_DATA),
            compressed=bool(e.flags & _native.EXTENT_COMPRESSED),
            offset=e.offset if e.flags & _native.EXTENT_OFFSET_VALID else None,
        )

    def _continued_by(self, nxt: "Extent") -> bool:
        """True when ``nxt`` continues this extent with the same status."""
        if self.start + self.length != nxt.start:
            return False
        if (self.depth, self.present, self.zero, self.data, self.compressed) != (
            nxt.depth,
            nxt.present,
            nxt.zero,
            nxt.data,
            nxt.compressed,
        ):
            return False
        if self.offset is None or nxt.offset is None:
            return self.offset is None and nxt.offset is None
        return self.offset + self.length == nxt.offset


# --- the handle ---------------------------------------------------------------------------


class Image:
    """An open qcow2 image; get one from :func:`cowdisk.open`.

    Offsets and lengths are guest (virtual disk) bytes and need no alignment. Methods may
    be called from several threads at once; :meth:`close` waits for calls in progress.
    Usable as a context manager, which closes the image on exit. Any method called on a
    closed image raises ``ValueError``; failures raise :class:`cowdisk.Error`.

    Attributes:
        path: the path the image was opened from.
        readonly: whether the image was opened read-only.
    """

    __slots__ = ("_handle", "_cond", "_active", "path", "readonly", "__weakref__")

    def __init__(self, handle: int, path, readonly: bool):
        """Private: wraps a live C handle. Use :func:`cowdisk.open` instead."""
        self._handle = handle
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self.path = path
        self.readonly = readonly

    # Every C call on the handle goes through _call: it keeps the handle alive while the
    # call runs (close waits for it) and turns a negative return into an Error.

    def _acquire(self) -> int:
        with self._cond:
            if self._handle is None:
                raise ValueError("I/O operation on closed image")
            self._active += 1
            return self._handle

    def _release(self) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0:
                self._cond.notify_all()

    def _call(self, fn, *args) -> None:
        handle = self._acquire()
        try:
            rc = fn(handle, *args)
        finally:
            self._release()
        check(rc, self.path)

    # --- public API ---

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._handle is None

    def close(self) -> None:
        """Flushes and closes the image. Idempotent; raises :class:`cowdisk.Error` if the
        final flush fails (the handle is released in any case)."""
        with self._cond:
            handle = self._handle
            if handle is None:
                return None
            self._handle = None
            while self._active:
                self._cond.wait()
        check(_lib.cowdisk_close(handle), self.path)
        return None

    def pread(self, length: int, offset: int) -> bytes:
        """Reads ``length`` bytes at guest ``offset`` and returns them.

        The range must lie within the virtual size (``Error`` with ``errno.EINVAL``
        otherwise). Unallocated areas read from the backing chain, or as zeros.
        """
        buf = bytearray(_length(length))
        self.readinto(buf, offset)
        return bytes(buf)

    def readinto(self, buffer, offset: int) -> int:
        """Reads into a writable, C-contiguous buffer (bytearray, memoryview, array, ...)
        exactly as many bytes as it holds, from guest ``offset``; returns that count."""
        offset = _uint(offset, "offset", _U64_MAX, self.path)
        with Pinned(buffer, writable=True) as pin:
            self._call(_lib.cowdisk_pread, pin.address, pin.nbytes, offset)
            return pin.nbytes

    def pwrite(self, data, offset: int) -> int:
        """Writes ``data`` (any bytes-like object) at guest ``offset``; returns its length.

        C-contiguous buffers are passed to the library without copying. The range must
        lie within the virtual size (``errno.EINVAL``); a read-only image gives
        ``errno.EROFS``. Data is durable after :meth:`flush` or :meth:`close`.
        """
        offset = _uint(offset, "offset", _U64_MAX, self.path)
        try:
            pin = Pinned(data, writable=False)
        except BufferError:
            pin = Pinned(memoryview(data).tobytes(), writable=False)  # non-contiguous
        with pin:
            self._call(_lib.cowdisk_pwrite, pin.address, pin.nbytes, offset)
            return pin.nbytes

    def file(self) -> "DiskFile":
        """Returns a seekable binary file object (:class:`cowdisk.DiskFile`) over the
        guest disk, for ``shutil.copyfileobj`` and other file-based code."""
        from ._file import DiskFile

        return DiskFile(self)

    def pwrite_compressed(self, data, offset: int) -> int:
        """Writes ``data`` at guest ``offset`` as compressed clusters (the image's
        compression type, zlib or zstd); returns its length.

        ``offset`` must be cluster-aligned and ``data`` whole clusters (only the image's
        last cluster may be partial). The clusters must be unallocated in this image, as
        QEMU requires (``errno.EINVAL`` otherwise, and nothing is written). Clusters
        that do not compress are stored normally. Compression runs on all cores.
        """
        offset = _uint(offset, "offset", _U64_MAX, self.path)
        try:
            pin = Pinned(data, writable=False)
        except BufferError:
            pin = Pinned(memoryview(data).tobytes(), writable=False)  # non-contiguous
        with pin:
            self._call(_lib.cowdisk_pwrite_compressed, pin.address, pin.nbytes, offset)
            return pin.nbytes

    def flush(self) -> None:
        """Makes everything written so far durable on the host storage."""
        self._call(_lib.cowdisk_flush)

    def amend(
        self,
        *,
        version: int | None = None,
        lazy_refcounts: bool | None = None,
        refcount_bits: int | None = None,
    ) -> None:
        """Changes the version (2 or 3), lazy refcounts or refcount width in place, as
        ``qemu-img amend`` does (refusing what it refuses); ``None`` keeps a setting.
        Crash-safe; needs a read-write handle."""
        s = _native.new_struct(_native.AmendOpts)
        s.version = _uint(version or 0, "version", _U32_MAX, self.path)
        s.lazy_refcounts = {None: 0, True: 1, False: 2}[lazy_refcounts]
        s.refcount_bits = _uint(refcount_bits or 0, "refcount_bits", _U32_MAX, self.path)
        self._call(_lib.cowdisk_amend, ctypes.byref(s))

    def check(self, repair: str | None = None) -> CheckResult:
        """Checks the metadata as ``qemu-img check`` does; ``repair`` is ``None``,
        ``"leaks"`` or ``"all"`` (a read-write handle; open an image marked corrupt with
        ``check=True``). Call again without ``repair`` to see what a repair left."""
        flags = {None: 0, "leaks": _native.CHECK_REPAIR_LEAKS, "all": _native.CHECK_REPAIR_ALL}
        if repair not in flags:
            raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
        s = _native.new_struct(_native.CheckResult)
        self._call(_lib.cowdisk_check, flags[repair], ctypes.byref(s))
        return CheckResult(*(getattr(s, f) for f in CheckResult.__dataclass_fields__))

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Makes guest ``[offset, offset+length)`` read as zeros, whatever the backing
        chain holds. No alignment needed; whole clusters become zero clusters, and with
        ``may_unmap`` their host clusters are released too. Out of range is
        ``errno.EINVAL``; a read-only image gives ``errno.EROFS``.
        """
        offset = _uint(offset, "offset", _U64_MAX, self.path)
        length = _uint(_length(length), "length", _U64_MAX, self.path)
        flags = _native.ZEROES_MAY_UNMAP if may_unmap else 0
        self._call(_lib.cowdisk_write_zeroes, offset, length, flags)

    def discard(self, offset: int, length: int) -> None:
        """Releases the whole clusters of guest ``[offset, offset+length)``; partial
        clusters at the edges are left unchanged. Released clusters read as zeros (on a
        v2 image with a backing file: as the backing file). With ``discard_unmap`` (see
        :func:`cowdisk.open`) the freed space is punched out of the image file.
        """
        offset = _uint(offset, "offset", _U64_MAX, self.path)
        length = _uint(_length(length), "length", _U64_MAX, self.path)
        self._call(_lib.cowdisk_discard, offset, length)

    def resize(self, size: int, force: bool = False) -> None:
        """Changes the virtual size to ``size`` bytes (a multiple of 512).

        Growing always works; the new bytes read as zeros. Shrinking raises
        :class:`cowdisk.Error` with ``errno.EINVAL`` when data is allocated past the new
        end, unless ``force`` (that data is then discarded); images with internal
        snapshots cannot shrink (``errno.ENOTSUP``).
        """
        size = _uint(size, "size", _U64_MAX, self.path)
        flags = _native.RESIZE_FORCE if force else 0
        self._call(_lib.cowdisk_resize_ex, size, flags)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Yields the :class:`Extent` list of guest ``[offset, offset+length)`` (to the
        end of the image when ``length`` is None; clamped to the virtual size), fetched
        from the library in batches. Adjacent extents with the same status are merged,
        so the result equals ``qemu-img map --output=json`` for the same range.
        """
        offset = _uint(offset, "offset", _U64_MAX, self.path)
        if length is None:
            end = _U64_MAX
        else:
            end = min(offset + _length(length), _U64_MAX)
        buf = (_native.Extent * _EXTENT_BATCH)()
        count = ctypes.c_size_t()
        pending = None
        pos = offset
        while pos < end:
            self._call(
                _lib.cowdisk_block_status,
                pos,
                end - pos,
                buf,
                _EXTENT_BATCH,
                ctypes.byref(count),
            )
            if count.value == 0:  # pos is the end of the image
                break
            for i in range(count.value):
                e = Extent._from_c(buf[i])
                if pending is None:
                    pending = e
                elif pending._continued_by(e):
                    pending = Extent(
                        pending.start,
                        pending.length + e.length,
                        pending.depth,
                        pending.present,
                        pending.zero,
                        pending.data,
                        pending.compressed,
                        pending.offset,
                    )
                else:
                    yield pending
                    pending = e
            last = buf[count.value - 1]
            nxt = last.start + last.length
            if nxt <= pos:
                raise RuntimeError(f"cowdisk_block_status made no progress at offset {pos}")
            pos = nxt
        if pending is not None:
            yield pending

    def map(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Returns :meth:`extents` as a list: like ``qemu-img map --output=json``."""
        return list(self.extents(offset, length))

    def _list(self, fn, ctype, record) -> list:
        """Calls a ``cowdisk_*_list`` function (count first, then the records) and
        converts each C record with ``record._from_c``."""
        count = ctypes.c_size_t()
        while True:
            self._call(fn, None, 0, ctypes.byref(count))
            n = count.value
            buf = (ctype * max(n, 1))()
            buf[0].struct_size = ctypes.sizeof(ctype)
            self._call(fn, buf, n, ctypes.byref(count))
            if count.value <= n:  # else one was added meanwhile: ask again
                return [record._from_c(buf[i]) for i in range(count.value)]

    # --- internal snapshots and VM state ---

    def snapshots(self) -> list[Snapshot]:
        """The internal snapshots, in table order, as :class:`Snapshot` records."""
        return self._list(_lib.cowdisk_snapshot_list, _native.SnapshotInfo, Snapshot)

    def snapshot_create(
        self,
        name: str,
        vmstate=None,
        vm_clock_nsec: int = 0,
        *,
        vm_state_size: int | None = None,
        icount: int | None = None,
    ) -> Snapshot:
        """Creates an internal snapshot named ``name`` and returns it.

        ``vmstate`` (bytes-like) is saved as the snapshot's VM state. Alternatively,
        after writing the state with :meth:`vmstate_writer` (and closing it), pass its
        ``size`` as ``vm_state_size``. ``icount`` is the record/replay instruction
        count, if any. The id is the next free number. A failed VM state save raises
        :class:`cowdisk.Error` and records nothing; ``errno.ENOTSUP`` means the image's
        refcount width cannot count another reference.
        """
        if vmstate is not None:
            if vm_state_size is not None:
                raise ValueError("give vmstate or vm_state_size, not both")
            vm_state_size = self.save_vmstate(vmstate, 0)
            self.finalize_vmstate()
        opts = _native.new_struct(_native.SnapshotOpts)
        opts.vm_state_size = _uint(vm_state_size or 0, "vm_state_size", _U64_MAX, self.path)
        opts.vm_clock_nsec = _uint(vm_clock_nsec, "vm_clock_nsec", _U64_MAX, self.path)
        opts.icount = -1 if icount is None else _uint(icount, "icount", 2**63 - 1, self.path)
        raw = name.encode("utf-8")
        if b"\0" in raw:
            raise ValueError("embedded null byte in snapshot name")
        self._call(_lib.cowdisk_snapshot_create, raw, ctypes.byref(opts))
        return [s for s in self.snapshots() if s.name == name][-1]

    def snapshot_goto(self, id_or_name: str) -> None:
        """Reverts the image to a snapshot (by id, else by name): its data, virtual
        size and VM state (read with :meth:`load_vmstate`). ``errno.ENOENT`` when there
        is no such snapshot."""
        self._call(_lib.cowdisk_snapshot_goto, str(id_or_name).encode("utf-8"))

    def snapshot_delete(self, id_or_name: str) -> None:
        """Deletes a snapshot (by id, else the first by name); ``errno.ENOENT`` when
        there is no such snapshot."""
        self._call(_lib.cowdisk_snapshot_delete, str(id_or_name).encode("utf-8"))

    def save_vmstate(self, data, pos: int) -> int:
        """Saves ``data`` as VM state at position ``pos``; returns its length.

        Sequential saves are buffered and written by background threads; see
        :meth:`vmstate_writer` for a file object and :meth:`finalize_vmstate` to wait.
        """
        pos = _uint(pos, "pos", _U64_MAX, self.path)
        try:
            pin = Pinned(data, writable=False)
        except BufferError:
            pin = Pinned(memoryview(data).tobytes(), writable=False)
        with pin:
            self._call(_lib.cowdisk_save_vmstate, pin.address, pin.nbytes, pos)
            return pin.nbytes

    def finalize_vmstate(self) -> None:
        """Writes buffered VM state, waits for the background writes and raises
        :class:`cowdisk.Error` with the first error any save met."""
        self._call(_lib.cowdisk_finalize_vmstate)

    def vmstate_writer(self, pos: int = 0) -> VMStateWriter:
        """A writable file object saving VM state from ``pos`` on; its ``close()``
        finalizes. Use it as a context manager, then ``snapshot_create(name,
        vm_state_size=writer.size)``."""
        return VMStateWriter(self, _uint(pos, "pos", _U64_MAX, self.path))

    def load_vmstate(self, length: int, pos: int = 0) -> bytes:
        """Reads ``length`` bytes of VM state at ``pos`` (after :meth:`snapshot_goto`:
        the snapshot's state); bytes never saved read as zeros."""
        pos = _uint(pos, "pos", _U64_MAX, self.path)
        buf = bytearray(_length(length))
        with Pinned(buf, writable=True) as pin:
            self._call(_lib.cowdisk_load_vmstate, pin.address, pin.nbytes, pos)
        return bytes(buf)

    # --- persistent dirty bitmaps ---

    def bitmaps(self) -> list[BitmapInfo]:
        """The persistent dirty bitmaps, in directory order, as :class:`BitmapInfo`
        records. ``errno.ENOTSUP`` when the image's bitmaps could not be read (a
        read-only open of an image with a damaged bitmap directory; a read-write open
        with ``drop_bitmaps`` gives them up and lists none)."""
        return self._list(_lib.cowdisk_bitmap_list, _native.BitmapInfo, BitmapInfo)

    def bitmap_add(self, name: str, granularity: int = 0, enabled: bool = True) -> None:
        """Adds an empty persistent dirty bitmap, like ``qemu-img bitmap --add``.

        ``granularity`` is the number of bytes one bit covers, a power of two from 512
        bytes to 2 GiB (0 = QEMU's default: the cluster size within 4 KiB..64 KiB).
        With ``enabled`` (the default) writes set its bits from now on. The bitmap is
        stored in the image by :meth:`close`. ``errno.EINVAL`` for a name in use or a
        bad granularity, ``errno.ENOTSUP`` for a version 2 image.
        """
        raw = _bitmap_name(name)
        granularity = _uint(granularity, "granularity", _U64_MAX, self.path)
        flags = 0 if enabled else _native.BITMAP_ADD_DISABLED
        self._call(_lib.cowdisk_bitmap_add, raw, granularity, flags)

    def bitmap_remove(self, name: str) -> None:
        """Removes a bitmap (inconsistent ones too); ``errno.ENOENT`` when there is
        none of that name."""
        self._call(_lib.cowdisk_bitmap_remove, _bitmap_name(name))

    def bitmap_clear(self, name: str) -> None:
        """Clears every bit of a bitmap (a new checkpoint starts)."""
        self._call(_lib.cowdisk_bitmap_clear, _bitmap_name(name))

    def bitmap_enable(self, name: str) -> None:
        """Makes a bitmap track writes (``qemu-img bitmap --enable``)."""
        self._call(_lib.cowdisk_bitmap_enable, _bitmap_name(name), 1)

    def bitmap_disable(self, name: str) -> None:
        """Makes a bitmap stop tracking writes (``qemu-img bitmap --disable``)."""
        self._call(_lib.cowdisk_bitmap_enable, _bitmap_name(name), 0)

    def bitmap_merge(self, name: str, source_name: str, source: "Image | None" = None) -> None:
        """Sets in bitmap ``name`` every bit that bitmap ``source_name`` of ``source``
        (another open :class:`Image`; ``None`` = this one) has set, like ``qemu-img
        bitmap --merge``. The granularities may differ. ``errno.ENOENT`` when either
        bitmap does not exist."""
        raw = _bitmap_name(name)
        src_raw = _bitmap_name(source_name, "source bitmap name")
        if source is None or source is self:
            self._call(_lib.cowdisk_bitmap_merge, raw, None, src_raw)
            return
        if not isinstance(source, Image):
            raise TypeError(f"source must be a cowdisk.Image or None, not {type(source).__name__}")
        src_handle = source._acquire()
        try:
            self._call(_lib.cowdisk_bitmap_merge, raw, src_handle, src_raw)
        finally:
            source._release()

    def dirty_extents(
        self, name: str, offset: int = 0, length: int | None = None
    ) -> list[DirtyExtent]:
        """The dirty and clean runs of bitmap ``name`` over guest ``[offset,
        offset+length)`` (to the end of the image when ``length`` is None; clamped to
        the virtual size), as :class:`DirtyExtent` records: contiguous, alternating,
        covering the range. What changed since the bitmap was added or cleared is what
        an incremental backup copies."""
        raw = _bitmap_name(name)
        offset = _uint(offset, "offset", _U64_MAX, self.path)
        if length is None:
            end = _U64_MAX
        else:
            end = min(offset + _length(length), _U64_MAX)
        buf = (_native.Extent * _EXTENT_BATCH)()
        count = ctypes.c_size_t()
        out: list[DirtyExtent] = []
        pos = offset
        while pos < end:
            self._call(
                _lib.cowdisk_bitmap_extents,
                raw,
                pos,
                end - pos,
                buf,
                _EXTENT_BATCH,
                ctypes.byref(count),
            )
            if count.value == 0:  # pos is the end of the image
                break
            for i in range(count.value):
                e = buf[i]
                dirty = bool(e.flags & _native.EXTENT_DIRTY)
                last = out[-1] if out else None
                if last is not None and last.dirty == dirty and last.start + last.length == e.start:
                    out[-1] = DirtyExtent(last.start, last.length + e.length, dirty)
                else:
                    out.append(DirtyExtent(e.start, e.length, dirty))
            last_c = buf[count.value - 1]
            nxt = last_c.start + last_c.length
            if nxt <= pos:
                raise RuntimeError(f"cowdisk_bitmap_extents made no progress at offset {pos}")
            pos = nxt
        return out

    @property
    def info(self) -> ImageInfo:
        """An :class:`ImageInfo` snapshot of the image's current state."""
        s = _native.new_struct(_native.Info)
        self._call(_lib.cowdisk_get_info, ctypes.byref(s))
        return ImageInfo._from_c(s)

    @property
    def size(self) -> int:
        """The virtual (guest-visible) size in bytes."""
        return self.info.virtual_size

    def __enter__(self) -> "Image":
        if self._handle is None:
            raise ValueError("I/O operation on closed image")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._handle is None else ("ro" if self.readonly else "rw")
        return f"<cowdisk.Image path={self.path!r} {state}>"

    def __reduce__(self):
        raise TypeError("cowdisk.Image cannot be pickled")

    def __del__(self):
        if getattr(self, "_handle", None) is None:
            return
        try:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=2)
        except Exception:  # warnings turned into errors, or interpreter shutdown
            pass
        try:
            self.close()
        except Exception:
            pass


# --- module-level functions ---------------------------------------------------------------


def create(
    path,
    size: int,
    *,
    version: int = 3,
    cluster_size: int = 65536,
    refcount_bits: int = 16,
    lazy_refcounts: bool = False,
    backing_file=None,
    backing_format: str | None = None,
    compression_type: str = "zlib",
    encrypt_format: str | None = None,
    secret=None,
    iter_time: int = 0,
    cipher_alg: str | None = None,
    cipher_mode: str | None = None,
    ivgen_alg: str | None = None,
    ivgen_hash_alg: str | None = None,
    hash_alg: str | None = None,
) -> None:
    """Creates a new qcow2 image of ``size`` bytes at ``path`` (str or path-like).

    The path must not exist yet (``errno.EEXIST``). ``version`` is 2 or 3;
    ``cluster_size`` a power of two from 512 to 2 MiB; ``refcount_bits`` one of 1, 2, 4,
    8, 16, 32, 64; ``lazy_refcounts`` needs version 3; ``compression_type`` is ``"zlib"``
    or ``"zstd"``. ``backing_file`` is stored in the image as given (relative names are
    resolved against the image's directory when opened); ``backing_format`` is
    ``"qcow2"``, ``"raw"`` or ``None`` to probe. With a backing file and ``size`` 0, the
    backing file's size is used. Bad options raise :class:`cowdisk.Error` (``EINVAL``).

    ``encrypt_format="luks"`` encrypts the image with LUKS (QEMU's default cipher
    aes-256-xts-plain64 unless ``cipher_alg`` (``"aes-128"``, ``"aes-192"``,
    ``"aes-256"``), ``cipher_mode`` (``"xts"``, ``"cbc"``), ``ivgen_alg``
    (``"plain"``, ``"plain64"``, ``"essiv"``), ``ivgen_hash_alg`` or ``hash_alg``
    (``"sha1"``, ``"sha256"``, ``"sha512"``) say otherwise; ``iter_time`` is the key
    derivation time in ms, 0 = 2000); ``"aes"`` is QEMU's legacy AES, weak, only when
    asked for. ``secret`` (bytes or str) is the passphrase; without one an encrypted
    create fails with ``errno.ENOKEY``.
    """
    p = _path_bytes(path)
    size = _uint(size, "size", _U64_MAX, path)
    try:
        compression = _COMPRESSION_BY_NAME[compression_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"compression_type must be 'zlib' or 'zstd', not {compression_type!r}"
        ) from None
    opts = _native.new_struct(_native.CreateOpts)
    opts.version = _uint(version, "version", _U32_MAX, path)
    opts.cluster_size = _uint(cluster_size, "cluster_size", _U32_MAX, path)
    opts.refcount_bits = _uint(refcount_bits, "refcount_bits", _U32_MAX, path)
    opts.flags = _native.CREATE_LAZY_REFCOUNTS if lazy_refcounts else 0
    opts.compression_type = compression
    backing = None if backing_file is None else _path_bytes(backing_file)
    fmt = None if backing_format is None else _path_bytes(backing_format)
    opts.backing_file = backing
    opts.backing_format = fmt
    _set_encryption(
        opts, encrypt_format, iter_time, cipher_alg, cipher_mode, ivgen_alg,
        ivgen_hash_alg, hash_alg, path,
    )
    with _SecretBuffer(secret) as sb:
        sb.attach(opts)
        check(_lib.cowdisk_create(p, size, ctypes.byref(opts)), path)


def _set_encryption(
    opts, encrypt_format, iter_time, cipher_alg, cipher_mode, ivgen_alg, ivgen_hash_alg,
    hash_alg, path,
) -> None:
    """Fills the encryption fields of a ``CreateOpts``."""
    if encrypt_format is None:
        opts.encrypt_format = _native.ENCRYPT_NONE
    else:
        try:
            opts.encrypt_format = _ENCRYPT_BY_NAME[encrypt_format]
        except (KeyError, TypeError):
            raise ValueError(
                f"encrypt_format must be 'luks', 'aes' or None, not {encrypt_format!r}"
            ) from None
    opts.iter_time_ms = _uint(iter_time, "iter_time", _U32_MAX, path)
    for field, value in (
        ("cipher_alg", cipher_alg),
        ("cipher_mode", cipher_mode),
        ("ivgen_alg", ivgen_alg),
        ("ivgen_hash_alg", ivgen_hash_alg),
        ("hash_alg", hash_alg),
    ):
        setattr(opts, field, None if value is None else str(value).encode("ascii"))


def open(  # noqa: A001 - the binding's public name, shadows the builtin on purpose
    path,
    readonly: bool = False,
    *,
    direct: bool = False,
    follow_backing: bool = True,
    l2_cache_size: int = 0,
    max_backing_depth: int = 0,
    discard_unmap: bool = False,
    compressed_cache: bool = True,
    compressed_cache_size: int = 0,
    force_share: bool = False,
    locking: bool = True,
    check: bool = False,
    secret=None,
    metadata_only: bool = False,
    snapshot=None,
    drop_bitmaps: bool = False,
) -> Image:
    """Opens the qcow2 image at ``path`` (str or path-like) and returns an :class:`Image`.

    ``readonly`` forbids writes; ``direct`` uses O_DIRECT; ``follow_backing=False``
    refuses to open backing files named in the image (reads of unallocated clusters then
    fail with ``errno.ENOTSUP``); ``l2_cache_size`` is in bytes (0 = enough for the whole
    disk, up to 32 MiB); ``max_backing_depth`` limits the chain (0 = 32);
    ``discard_unmap`` punches clusters freed by :meth:`Image.discard` (and by
    ``write_zeroes`` with ``may_unmap``) out of the image file, like QEMU's
    ``discard=unmap``. ``compressed_cache`` gathers compressed clusters written by
    :meth:`Image.pwrite_compressed` into whole host clusters written with aligned writes
    (``compressed_cache_size`` bytes of memory, 0 = 4 MiB); without it each compressed
    cluster is written on its own, as QEMU does.

    The image file is locked as QEMU locks it while the image is open: a read-write
    open fails with ``errno.EBUSY`` while another process (QEMU or cowdisk) uses the
    image, a read-only one while another process writes it — unless ``force_share``
    (read-only opens only, like ``qemu-img -U``). ``locking=False`` takes no locks,
    for callers that coordinate access themselves. ``check=True`` opens an image marked
    corrupt read-write for :meth:`Image.check` to repair (other writes fail until then).

    ``secret`` (bytes or str) is the passphrase of an encrypted image (and of
    encrypted backing files): without it opening one fails with ``errno.ENOKEY``, with
    a wrong one ``errno.EKEYREJECTED``. ``metadata_only=True`` opens an encrypted image
    without its passphrase for :attr:`Image.info`, :meth:`Image.check` and
    :meth:`Image.map`; reading or writing its data then fails with ``ENOKEY``.

    ``snapshot`` (the id or name of an internal snapshot, with ``readonly=True``) shows
    the disk as that snapshot recorded it, its contents and size, like ``qemu-img
    convert -l``; ``ENOENT`` when the image has no such snapshot.

    ``drop_bitmaps=True`` lets a read-write open go on when the image's persistent
    dirty bitmaps cannot be kept (an unknown bitmap type or flag, a damaged bitmap
    directory): they are given up, as a program without bitmap support would (their
    clusters leak until ``check(repair="leaks")``). Without it such an open fails and
    says why; readable bitmaps are kept either way.

    Raises :class:`cowdisk.Error`: ``ENOENT`` and other host errors, ``EBUSY`` (see
    above), ``EINVAL`` for a file that is not qcow2, ``ENOTSUP`` for unsupported
    features, ``EIO`` for corrupt metadata.
    """
    p = _path_bytes(path)
    opts = _native.new_struct(_native.OpenOpts)
    flags = 0
    if readonly:
        flags |= _native.OPEN_READONLY
    if direct:
        flags |= _native.OPEN_DIRECT
    if not follow_backing:
        flags |= _native.OPEN_NO_BACKING
    if discard_unmap:
        flags |= _native.OPEN_DISCARD_UNMAP
    if not compressed_cache:
        flags |= _native.OPEN_NO_COMPRESSED_CACHE
    if force_share:
        flags |= _native.OPEN_FORCE_SHARE
    if not locking:
        flags |= _native.OPEN_NO_LOCK
    if check:
        flags |= _native.OPEN_CHECK
    if metadata_only:
        flags |= _native.OPEN_METADATA_ONLY
    if drop_bitmaps:
        flags |= _native.OPEN_DROP_BITMAPS
    opts.flags = flags
    opts.l2_cache_size = _uint(l2_cache_size, "l2_cache_size", _U64_MAX, path)
    opts.max_backing_depth = _uint(max_backing_depth, "max_backing_depth", _U32_MAX, path)
    opts.compressed_cache_size = _uint(
        compressed_cache_size, "compressed_cache_size", _U64_MAX, path
    )
    if snapshot is not None:
        if not isinstance(snapshot, str) or not snapshot:
            raise invalid("snapshot must be a non-empty str", path)
        opts.snapshot = snapshot.encode()
    handle = _native.Handle()
    with _SecretBuffer(secret) as sb:
        sb.attach(opts)
        rc = _lib.cowdisk_open(p, ctypes.byref(opts), ctypes.byref(handle))
    _check_rc(rc, path)
    return Image(handle.value, os.fspath(path), bool(readonly))


def version() -> str:
    """Returns the version string of the loaded libcowdisk, for example ``"0.1.0"``."""
    return _lib.cowdisk_version().decode("ascii", errors="replace")
