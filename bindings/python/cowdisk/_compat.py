"""What the binding needs to run on every supported Python (3.8+)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

# ``@frozen_dataclass``: a frozen dataclass, with ``__slots__`` where Python can make them
# (``slots=`` is Python 3.10+; older Pythons get the same class with a ``__dict__``).
if sys.version_info >= (3, 10):
    frozen_dataclass = dataclass(frozen=True, slots=True)
else:
    frozen_dataclass = dataclass(frozen=True)
