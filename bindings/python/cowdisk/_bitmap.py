"""Persistent dirty bitmaps: the :class:`BitmapInfo` and :class:`DirtyExtent` records."""

from __future__ import annotations

from . import _native
from ._compat import frozen_dataclass


@frozen_dataclass
class BitmapInfo:
    """A persistent dirty bitmap, as listed by :meth:`Image.bitmaps`.

    Attributes:
        name: its name, unique in the image (at most 1023 bytes of UTF-8).
        granularity: bytes of guest data one bit covers.
        enabled: writes set its bits (QEMU's ``auto`` flag).
        inconsistent: it was marked in use when the image was opened (a crash, or
            another program has the image open): its bits cannot be trusted, it is kept
            as it is, and it can only be removed.
        dirty_bytes: bytes covered by set bits (0 for an inconsistent bitmap).
    """

    name: str
    granularity: int
    enabled: bool
    inconsistent: bool
    dirty_bytes: int

    @classmethod
    def _from_c(cls, s: _native.BitmapInfo) -> "BitmapInfo":
        return cls(
            name=s.name.decode("utf-8", errors="replace"),
            granularity=s.granularity,
            enabled=bool(s.flags & _native.BITMAP_ENABLED),
            inconsistent=bool(s.flags & _native.BITMAP_INCONSISTENT),
            dirty_bytes=s.dirty_bytes,
        )


@frozen_dataclass
class DirtyExtent:
    """A run of guest bytes that a bitmap marks all dirty or all clean, as listed by
    :meth:`Image.dirty_extents`.

    Attributes:
        start: guest offset of the first byte.
        length: length in bytes.
        dirty: the bytes changed since the bitmap was added (or last cleared).
    """

    start: int
    length: int
    dirty: bool
