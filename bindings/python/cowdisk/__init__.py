"""Python binding for cowdisk, a qcow2 block-driver library (ctypes over its C ABI).

Example::

    import cowdisk

    cowdisk.create("disk.qcow2", 1 << 30)
    with cowdisk.open("disk.qcow2") as img:
        img.pwrite(b"hello", 4096)
        assert img.pread(5, 4096) == b"hello"
    cowdisk.convert("disk.qcow2", "small.qcow2", compressed=True,
                    progress=lambda done, total: print(done, "/", total))

The shared library is found through ``$COWDISK_LIB``, then ``libcowdisk.so`` in this
package, then (in a repository checkout) ``build/lib``, ``target/release`` and
``target/debug``, then the system's ``libcowdisk.so.0``. ``cowdisk.library_path`` is the
path that was loaded.
"""

from ._bitmap import BitmapInfo, DirtyExtent
from ._convert import Comparison, commit, compare, convert, rebase
from ._errors import Error, strerror
from ._file import DiskFile
from ._image import CheckResult, Extent, Image, ImageInfo, create, open, version
from ._snapshot import Snapshot, VMStateWriter
from ._native import lib_path as library_path

__all__ = [
    "BitmapInfo",
    "CheckResult",
    "Comparison",
    "DirtyExtent",
    "DiskFile",
    "Error",
    "Extent",
    "Image",
    "ImageInfo",
    "Snapshot",
    "VMStateWriter",
    "commit",
    "compare",
    "convert",
    "create",
    "open",
    "rebase",
    "version",
    "strerror",
    "library_path",
]

__version__ = "0.1.0"

for _obj in (
    BitmapInfo,
    CheckResult,
    Comparison,
    DirtyExtent,
    DiskFile,
    Error,
    Extent,
    Image,
    ImageInfo,
    Snapshot,
    VMStateWriter,
):
    _obj.__module__ = __name__
del _obj
