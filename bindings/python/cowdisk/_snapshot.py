"""Internal snapshots and VM state: the :class:`Snapshot` record and the
:class:`VMStateWriter` file object."""

from __future__ import annotations

import io

from . import _native
from ._compat import frozen_dataclass


@frozen_dataclass
class Snapshot:
    """An internal snapshot, as listed by :meth:`Image.snapshots`.

    Attributes:
        id: unique id (a decimal number for snapshots QEMU or cowdisk made).
        name: name (tag); several snapshots may share one.
        vm_state_size: bytes of VM state recorded (0 = disk-only snapshot).
        date_sec: creation time, seconds since the Unix epoch.
        date_nsec: creation time, nanoseconds.
        vm_clock_nsec: guest clock when it was taken, in nanoseconds.
        disk_size: virtual disk size when it was taken.
        icount: instruction count for record/replay, or ``None``.
    """

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    disk_size: int
    icount: int | None

    @classmethod
    def _from_c(cls, s: _native.SnapshotInfo) -> "Snapshot":
        return cls(
            id=s.id.decode("utf-8", errors="replace"),
            name=s.name.decode("utf-8", errors="replace"),
            vm_state_size=s.vm_state_size,
            date_sec=s.date_sec,
            date_nsec=s.date_nsec,
            vm_clock_nsec=s.vm_clock_nsec,
            disk_size=s.disk_size,
            icount=None if s.icount < 0 else s.icount,
        )


class VMStateWriter(io.RawIOBase):
    """A writable, sequential file object saving VM state into an image; returned by
    :meth:`Image.vmstate_writer`.

    Each :meth:`write` hands its bytes to ``cowdisk_save_vmstate`` at the current
    position: small writes are buffered by the library (1 MiB chunks written by
    background threads), so there is no point in wrapping this in a ``BufferedWriter``.
    :meth:`close` finalizes (waits for every background write) and raises
    :class:`cowdisk.Error` if any failed. :attr:`size` is the number of bytes written:
    pass it as ``vm_state_size`` to :meth:`Image.snapshot_create`.
    """

    def __init__(self, image, pos: int = 0):
        super().__init__()
        self._image = image
        self._pos = pos
        self._start = pos

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        if self.closed:
            raise ValueError("write to closed VMStateWriter")
        n = self._image.save_vmstate(data, self._pos)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    @property
    def size(self) -> int:
        """Bytes written through this writer."""
        return self._pos - self._start

    def flush(self) -> None:
        # The library's buffers are written on close (finalize), not per flush.
        if self.closed:
            raise ValueError("flush of closed VMStateWriter")

    def close(self) -> None:
        """Finalizes the VM state (idempotent); raises :class:`cowdisk.Error` when a
        write failed."""
        if self.closed:
            return
        try:
            if not self._image.closed:  # closing the image finalized already
                self._image.finalize_vmstate()
        finally:
            super().close()
