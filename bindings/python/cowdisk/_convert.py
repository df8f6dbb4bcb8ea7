"""The copy engine: :func:`convert`, :func:`compare`, :func:`commit` and :func:`rebase`.

Each call runs in the library (its worker threads read and write without the GIL); a
``progress`` callable, when given, is called on the calling thread with ``(done,
total)`` in bytes, so it may touch Python state freely.
"""

from __future__ import annotations

import ctypes

from . import _native
from ._compat import frozen_dataclass
from ._errors import check
from ._image import (
    _COMPRESSION_BY_NAME,
    _U32_MAX,
    _U64_MAX,
    _path_bytes,
    _SecretBuffer,
    _set_encryption,
    _uint,
)

_lib = _native.lib

_FORMATS = (None, "qcow2", "raw")


def _format(value, name: str) -> str | None:
    if value not in _FORMATS:
        raise ValueError(f"{name} must be 'qcow2', 'raw' or None, not {value!r}")
    return value


class _Progress:
    """Wraps a Python progress callable as a ``cowdisk_progress_fn``.

    An exception raised by the callable must not unwind through C: it is kept, the
    copy is cancelled, and :meth:`reraise` raises it once the C call has returned.
    """

    def __init__(self, fn):
        self.fn = fn
        self.error: BaseException | None = None
        self.cancelled = False
        # A NULL function pointer when there is no callable (ctypes refuses None here).
        self.c_fn = _native.PROGRESS_FN(self._call) if fn is not None else _native.PROGRESS_FN()

    def _call(self, _opaque, done: int, total: int) -> int:
        if self.error is not None or self.cancelled:
            return 1
        try:
            if self.fn(done, total) is False:
                self.cancelled = True
                return 1
            return 0
        except BaseException as e:  # noqa: BLE001 - re-raised after the C call
            self.error = e
            return 1

    def finish(self, rc: int, filename) -> None:
        """Raises the callable's exception, else the call's error (if any)."""
        if self.error is not None:
            err, self.error = self.error, None
            # The copy's ECANCELED is the consequence, the callable's exception the cause.
            raise err
        check(rc, filename)


def convert(
    src,
    dst,
    *,
    source_format: str | None = None,
    target_format: str = "qcow2",
    snapshot: str | None = None,
    compressed: bool = False,
    existing: bool = False,
    target_is_zero: bool = False,
    out_of_order: bool = False,
    workers: int = 0,
    min_sparse: int | None = 4096,
    source_direct: bool = False,
    target_direct: bool = False,
    flush: bool = True,
    force_share: bool = False,
    bitmaps: bool = False,
    skip_broken_bitmaps: bool = False,
    backing_file=None,
    backing_format: str | None = None,
    version: int | None = None,
    cluster_size: int | None = None,
    refcount_bits: int | None = None,
    lazy_refcounts: bool = False,
    compression_type: str | None = None,
    secret=None,
    encrypt_format: str | None = None,
    target_secret=None,
    iter_time: int = 0,
    progress=None,
) -> None:
    """Copies the image at ``src`` into ``dst``, as ``qemu-img convert`` does.

    ``src`` is a qcow2 image (read with its backing chain) or a raw file
    (``source_format``: ``"qcow2"``, ``"raw"`` or ``None`` to probe); ``snapshot`` (id
    or name) converts one of its internal snapshots. ``dst`` is a new qcow2 image
    (``target_format="qcow2"``, with ``version``, ``cluster_size``, ``refcount_bits``,
    ``lazy_refcounts`` and ``compression_type`` as in :func:`cowdisk.create`; ``None``
    means the library's default) or a raw file (``"raw"``). A file already at ``dst`` is
    replaced, unless ``existing=True`` writes into it (``-n``; ``target_is_zero=True``
    then skips writing zeros, like ``--target-is-zero``).

    ``compressed`` writes every cluster compressed (``-c``); ``workers`` is the number
    of parallel workers (1 to 16, 0 = 8, ``-m``); ``out_of_order`` lets writes land as
    soon as they are ready (``-W``); zero runs of at least ``min_sparse`` bytes inside
    data are not written as data (``-S``; ``None`` or 0 turns that off);
    ``source_direct``/``target_direct`` use O_DIRECT (``-T none``/``-t none``);
    ``flush=False`` never flushes the target (``-t unsafe``); ``force_share`` reads a
    source another process writes (``-U``). ``bitmaps`` carries the source's
    persistent dirty bitmaps into the qcow2 target (``--bitmaps``; an inconsistent one
    fails the convert unless ``skip_broken_bitmaps``). ``backing_file`` gives the new target a
    backing file (``-B``, ``backing_format`` as ``-F``): only what reads differently
    from it is copied.

    ``secret`` is the passphrase of an encrypted source (and of an encrypted existing
    target unless ``target_secret`` is given); ``encrypt_format="luks"`` (or
    ``"aes"``) encrypts a new target with ``target_secret`` (``iter_time`` ms of key
    derivation, 0 = 2000), as ``-o encrypt.format=luks,encrypt.key-secret=…``.

    ``progress(done, total)`` (bytes) is called on this thread, at least at the start
    and at the end, ``done`` never going backwards. Returning ``False`` cancels (raises
    :class:`cowdisk.Error` with ``errno.ECANCELED``); an exception it raises cancels
    and propagates (raised on the last call, when ``done == total``, it propagates
    although the copy is complete). A failed or cancelled convert removes a target it
    created.

    Raises :class:`cowdisk.Error` (``ENOENT``, ``EBUSY``, ``ENOSPC``, ``EINVAL``, ...),
    its message naming what failed.
    """
    s, d = _path_bytes(src), _path_bytes(dst)
    source_format = _format(source_format, "source_format")
    if target_format not in ("qcow2", "raw"):
        raise ValueError(f"target_format must be 'qcow2' or 'raw', not {target_format!r}")
    opts = _native.new_struct(_native.ConvertOpts)
    flags = 0
    for on, flag in (
        (compressed, _native.CONVERT_COMPRESSED),
        (out_of_order, _native.CONVERT_OUT_OF_ORDER),
        (existing, _native.CONVERT_EXISTING_TARGET),
        (target_is_zero, _native.CONVERT_TARGET_IS_ZERO),
        (source_format == "raw", _native.CONVERT_SOURCE_RAW),
        (source_format == "qcow2", _native.CONVERT_SOURCE_QCOW2),
        (target_format == "raw", _native.CONVERT_TARGET_RAW),
        (source_direct, _native.CONVERT_SOURCE_DIRECT),
        (target_direct, _native.CONVERT_TARGET_DIRECT),
        (force_share, _native.CONVERT_FORCE_SHARE),
        (not flush, _native.CONVERT_TARGET_NO_FLUSH),
        (bitmaps, _native.CONVERT_BITMAPS),
        (skip_broken_bitmaps, _native.CONVERT_SKIP_BROKEN_BITMAPS),
        (not min_sparse, _native.CONVERT_NO_SPARSE),
    ):
        if on:
            flags |= flag
    opts.flags = flags
    opts.workers = _uint(workers, "workers", _U32_MAX, src)
    if min_sparse:
        opts.min_sparse = _uint(min_sparse, "min_sparse", _U64_MAX, src)

    create = None
    if any(
        v is not None
        for v in (version, cluster_size, refcount_bits, compression_type, encrypt_format, target_secret)
    ) or (lazy_refcounts):
        create = _native.new_struct(_native.CreateOpts)
        create.version = _uint(version or 0, "version", _U32_MAX, dst)
        create.cluster_size = _uint(cluster_size or 0, "cluster_size", _U32_MAX, dst)
        create.refcount_bits = _uint(refcount_bits or 0, "refcount_bits", _U32_MAX, dst)
        create.flags = _native.CREATE_LAZY_REFCOUNTS if lazy_refcounts else 0
        if compression_type is not None:
            try:
                create.compression_type = _COMPRESSION_BY_NAME[compression_type]
            except (KeyError, TypeError):
                raise ValueError(
                    f"compression_type must be 'zlib' or 'zstd', not {compression_type!r}"
                ) from None
        _set_encryption(create, encrypt_format, iter_time, None, None, None, None, None, dst)
        opts.create = ctypes.pointer(create)
    keep = [
        None if snapshot is None else snapshot.encode("utf-8"),
        None if backing_file is None else _path_bytes(backing_file),
        None if backing_format is None else _format(backing_format, "backing_format").encode(),
    ]
    opts.snapshot, opts.backing_file, opts.backing_format = keep

    cb = _Progress(progress)
    opts.progress = cb.c_fn
    with _SecretBuffer(secret) as source_key, _SecretBuffer(target_secret) as target_key:
        source_key.attach(opts)
        if create is not None:
            target_key.attach(create)
        rc = _lib.cowdisk_convert(s, d, ctypes.byref(opts))
        error = cb.error
        if error is None and rc < 0:
            # Read the message before anything else runs on this thread.
            try:
                cb.finish(rc, src)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after wiping
                error = e
    if error is not None:
        raise error


@frozen_dataclass
class Comparison:
    """The result of :func:`compare`.

    Attributes:
        identical: both images read the same (the larger one's extra part as zeros,
            unless ``strict``).
        offset: where they first differ — the offset of the 512-byte sector holding
            the first difference, as ``qemu-img compare`` reports it (in strict mode
            with different sizes: the smaller size) — or ``None`` when identical.
    """

    identical: bool
    offset: int | None

    def __bool__(self) -> bool:
        return self.identical


def compare(
    a,
    b,
    *,
    strict: bool = False,
    a_format: str | None = None,
    b_format: str | None = None,
    force_share: bool = False,
) -> Comparison:
    """Compares what the images ``a`` and ``b`` read (qcow2 with their backing chains,
    or raw; ``a_format``/``b_format`` ``"raw"`` forces raw, ``"qcow2"`` or ``None``
    probes), reading both in parallel, as ``qemu-img compare`` does. ``strict`` makes
    a size difference a difference (``-s``); ``force_share`` reads images another
    process writes (``-U``). Returns a :class:`Comparison` (true when identical).
    """
    pa, pb = _path_bytes(a), _path_bytes(b)
    flags = 0
    if strict:
        flags |= _native.COMPARE_STRICT
    if _format(a_format, "a_format") == "raw":
        flags |= _native.COMPARE_FIRST_RAW
    if _format(b_format, "b_format") == "raw":
        flags |= _native.COMPARE_SECOND_RAW
    if force_share:
        flags |= _native.COMPARE_FORCE_SHARE
    mismatch = ctypes.c_uint64()
    rc = _lib.cowdisk_compare(pa, pb, flags, ctypes.byref(mismatch))
    check(rc, a)
    if rc == 0:
        return Comparison(True, None)
    return Comparison(False, mismatch.value)


def commit(path, *, base=None, keep: bool = False, progress=None) -> None:
    """Commits the image at ``path`` into ``base`` (``None``: its backing file), as
    ``qemu-img commit`` does: what the layers above the base allocate is copied into
    it and the base is flushed; then, when committing into the backing file without
    ``keep`` (``-d``), the image is emptied so that it reads through its backing file.
    ``progress`` as in :func:`convert` (cancelling leaves the base holding part of the
    data, which the top still holds too).

    Raises :class:`cowdisk.Error`: ``EINVAL`` when there is no backing file or
    ``base`` is not in the chain, ``EBUSY``, host errors.
    """
    p = _path_bytes(path)
    b = None if base is None else _path_bytes(base)
    flags = _native.COMMIT_KEEP if keep else 0
    cb = _Progress(progress)
    rc = _lib.cowdisk_commit(p, b, flags, cb.c_fn, None)
    cb.finish(rc, path)


def rebase(
    path,
    backing=None,
    *,
    backing_format: str | None = None,
    unsafe: bool = False,
    progress=None,
) -> None:
    """Rebases the image at ``path`` onto ``backing`` (``None`` or ``""``: no backing
    file; a relative name resolves against the image's directory), as ``qemu-img
    rebase`` does: every cluster the image does not allocate itself that reads
    differently through the new backing file is written into the image first, then the
    header names the new file. ``unsafe`` only renames (``-u``). ``progress`` as in
    :func:`convert` (cancelling leaves the image on its old backing file, reading as
    before).
    """
    p = _path_bytes(path)
    bk = None if backing is None else _path_bytes(backing)
    fmt = None if backing_format is None else _format(backing_format, "backing_format").encode()
    flags = _native.REBASE_UNSAFE if unsafe else 0
    cb = _Progress(progress)
    rc = _lib.cowdisk_rebase(p, bk, fmt, flags, cb.c_fn, None)
    cb.finish(rc, path)
