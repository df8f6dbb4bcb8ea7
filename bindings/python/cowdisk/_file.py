"""A file-like view of an image's guest disk: :class:`DiskFile`."""

from __future__ import annotations

import io
import os


class DiskFile(io.RawIOBase):
    """The guest disk of an open :class:`cowdisk.Image` as a seekable binary file
    (returned by :meth:`Image.file`), so ``shutil.copyfileobj``, ``io.BufferedReader``
    and friends work on it.

    Reads past the end of the disk return what is left (``b""`` at the end); writes
    past the end fail (a disk does not grow by writing: use :meth:`Image.resize`).
    Closing the view does not close the image. Each view has its own position; the
    image may be shared by several views and threads.
    """

    def __init__(self, image):
        super().__init__()
        self._image = image
        self._pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return not self._image.info.read_only

    def seekable(self) -> bool:
        return True

    def _check(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on a closed DiskFile")

    def readinto(self, buffer) -> int:
        self._check()
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._image.size - self._pos))
        if n:
            self._image.readinto(view[:n], self._pos)
            self._pos += n
        return n

    def write(self, data) -> int:
        self._check()
        view = memoryview(data).cast("B")
        n = self._image.pwrite(view, self._pos)
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._image.size + offset
        else:
            raise ValueError(f"invalid whence {whence!r}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._check()
        return self._pos

    def flush(self) -> None:
        """Flushes the image (makes what was written durable)."""
        self._check()
        if self.writable():
            self._image.flush()

    @property
    def size(self) -> int:
        """The size of the guest disk in bytes."""
        return self._image.size

    def __repr__(self) -> str:
        return f"<cowdisk.DiskFile of {self._image!r} at {self._pos}>"
