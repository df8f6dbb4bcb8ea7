"""Zero-copy access to the memory of any Python buffer (bytes, bytearray, memoryview,
array, mmap, ...) for the duration of one C call.

The buffer is exported with ``PyObject_GetBuffer`` and released afterwards, so its
address is stable while the C call runs without the GIL (a bytearray cannot be resized
while exported).
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, Structure, c_char_p, c_int, c_void_p, py_object

_PyBUF_SIMPLE = 0
_PyBUF_WRITABLE = 1


class _PyBuffer(Structure):
    # Py_buffer, part of the stable ABI since Python 3.11.
    _fields_ = [
        ("buf", c_void_p),
        ("obj", c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", c_int),
        ("ndim", c_int),
        ("format", c_char_p),
        ("shape", c_void_p),
        ("strides", c_void_p),
        ("suboffsets", c_void_p),
        ("internal", c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [py_object, POINTER(_PyBuffer), c_int]
_get_buffer.restype = c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [POINTER(_PyBuffer)]
_release_buffer.restype = None


class Pinned:
    """Context manager exposing ``address`` and ``nbytes`` of a C-contiguous buffer.

    Raises ``TypeError`` for objects that are not buffers (or not writable when
    ``writable`` is true) and ``BufferError`` for non-contiguous buffers.
    """

    __slots__ = ("_view", "_held", "address", "nbytes")

    def __init__(self, obj, writable: bool):
        self._held = False
        view = memoryview(obj)  # TypeError for non-buffers, with Python's usual message
        if writable and view.readonly:
            raise TypeError(
                f"a writable bytes-like object is required, not {type(obj).__name__!r}"
            )
        if not view.c_contiguous:
            raise BufferError("the buffer must be C-contiguous")
        view.release()
        self._view = _PyBuffer()
        flags = _PyBUF_WRITABLE if writable else _PyBUF_SIMPLE
        _get_buffer(obj, ctypes.byref(self._view), flags)  # raises on failure
        self._held = True
        self.address = self._view.buf
        self.nbytes = self._view.len

    def release(self) -> None:
        """Releases the export (idempotent)."""
        if self._held:
            self._held = False
            _release_buffer(ctypes.byref(self._view))

    def __enter__(self) -> "Pinned":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()
