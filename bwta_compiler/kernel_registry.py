"""Process-wide table of launchable generated kernels, keyed by the name the selector bound.

The fused ops (``bwta::linear``, ``bwta::qbmm``) carry a ``kernel_id`` string argument; when it is
not empty they call the entry registered here instead of their reference implementation.  The
backend fills the table at compile time (and again on a kernel-cache hit), so a graph never
names a kernel that is not loaded in this process.
"""

from __future__ import annotations

from collections.abc import Callable

_KERNELS: dict[str, Callable] = {}


def register(name: str, fn: Callable) -> None:
    _KERNELS[name] = fn


def get(name: str) -> Callable:
    try:
        return _KERNELS[name]
    except KeyError:
        raise KeyError(f"bwta kernel {name!r} is not loaded in this process (known: {len(_KERNELS)})") from None


def loaded() -> list[str]:
    return sorted(_KERNELS)
