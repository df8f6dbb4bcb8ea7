"""Builds libcowdisk (the Rust crate at the repository root) into the wheel as
``cowdisk/libcowdisk.so``, stripped. The metadata is in pyproject.toml."""

import os

from setuptools import setup
from setuptools_rust import Binding, RustExtension, Strip
from setuptools_rust.build import build_rust

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:
    from wheel.bdist_wheel import bdist_wheel


class build_rust_cdylib(build_rust):
    """Installs the cdylib as ``libcowdisk.so`` (the name ctypes loads), not under a
    Python extension-module name: it is a C library, not an extension module."""

    def get_dylib_ext_path(self, ext, target_fname):
        path = super().get_dylib_ext_path(ext, target_fname)
        return os.path.join(os.path.dirname(path), "libcowdisk.so")


class bdist_wheel_any_python(bdist_wheel):
    """Tags the wheel py3-none-<platform>: the library does not use Python's C API."""

    def get_tag(self):
        return ("py3", "none", super().get_tag()[2])


setup(
    rust_extensions=[
        RustExtension(
            "cowdisk.libcowdisk",
            path="../../Cargo.toml",
            binding=Binding.NoBinding,
            debug=False,
            strip=Strip.All,  # strip -x: no debug info, no local symbols
            # Cargo.toml's own [lib] crate types: setuptools-rust would otherwise build
            # only a cdylib, which cargo treats as another build of the crate than
            # `cargo build`'s (a rebuild each time one follows the other).
            args=["--locked", "--crate-type", "cdylib,staticlib,rlib"],
        )
    ],
    cmdclass={"build_rust": build_rust_cdylib, "bdist_wheel": bdist_wheel_any_python},
    zip_safe=False,
)
