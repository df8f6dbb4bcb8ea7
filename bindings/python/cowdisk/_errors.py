"""The exception type and the one helper that turns C return codes into exceptions."""

from __future__ import annotations

import errno
import os

from . import _native


class Error(OSError):
    """A failure reported by libcowdisk.

    A subclass of :class:`OSError`: ``errno`` is the positive errno value (for example
    ``errno.ENOENT``, ``errno.EINVAL``, ``errno.EROFS``), ``strerror`` is the library's
    message for the failure, and ``filename`` is the image path when one is involved.
    Built as ``Error(errno, message)`` or ``Error(errno, message, filename)``.

    Errors raised by the library are also instances of Python's own OSError subclass
    for their errno: ``except FileNotFoundError``, ``PermissionError``,
    ``FileExistsError``, ``IsADirectoryError`` ... catch them too.
    """


# errno -> the subclass of Error that is also Python's own OSError subclass for that
# errno (FileNotFoundError for ENOENT, ...), made on first use.
_BY_ERRNO: dict[int, type] = {}


def error_class(code: int) -> type:
    """The class of the errors the library raises for ``code``: :class:`Error`, and
    also the built-in OSError subclass Python uses for that errno (``except
    FileNotFoundError`` catches a missing image), when there is one."""
    cls = _BY_ERRNO.get(code)
    if cls is None:
        builtin = type(OSError(code, ""))
        if builtin is OSError:
            cls = Error
        else:
            cls = type("Error", (Error, builtin), {"__module__": "cowdisk", "__doc__": Error.__doc__})
        _BY_ERRNO[code] = cls
    return cls


def _decode(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", errors="replace")


def strerror(code: int) -> str:
    """Returns libcowdisk's description of an errno value (either sign accepted)."""
    return _decode(_native.lib.cowdisk_strerror(int(code)))


def check(rc: int, filename: str | os.PathLike | None = None) -> None:
    """Raises :class:`Error` if ``rc`` (a C return code) is a negative errno.

    Must be called right after the C call, on the same thread, so that
    ``cowdisk_last_error()`` still holds that call's message.
    """
    if rc >= 0:
        return
    code = -rc
    message = _decode(_native.lib.cowdisk_last_error()) or strerror(code)
    cls = error_class(code)
    if filename is None:
        raise cls(code, message)
    raise cls(code, message, os.fspath(filename))


def invalid(message: str, filename: str | os.PathLike | None = None) -> Error:
    """Builds an ``EINVAL`` :class:`Error` for argument checks done on the Python side."""
    if filename is None:
        return Error(errno.EINVAL, message)
    return Error(errno.EINVAL, message, os.fspath(filename))
