"""Output tensors for the CPU kernels, backed by transparent huge pages where Linux allows it.

Why: a large ``torch.empty`` (glibc serves 32 MiB and more with a fresh ``mmap`` on every call) is
untouched memory, and the kernel's first write to each 4 KiB page takes a page fault that zeroes it.
Measured on the 2-core AMD EPYC VM: 2048 x 4096 fp32 outputs (32 MiB) cost 25-30 ms of faults per
call against ~150 ms for the 4096x4096 BT linear itself, and 7.5 ms when the same range is advised
``MADV_HUGEPAGE`` first (16 faults of 2 MiB instead of 8192 of 4 KiB).  torch can do the same for
every allocation with ``THP_MEM_ALLOC_ENABLE=1``, but only when set before torch starts; this helper
advises just the kernels' own large outputs.

Only the 2 MiB-aligned interior of a tensor is advised (the ends stay on small pages), only where
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` (``always`` needs no advice,
``never`` refuses it), and a failed ``madvise`` is ignored: it is an optimisation, never required.
"""

from __future__ import annotations

import ctypes
import sys
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

HUGE_PAGE_BYTES = 2 << 20
# Below this the faults cost little next to the kernel (and small tensors come from glibc's heap,
# already faulted in); 8 MiB = four huge pages.
MIN_ADVISE_BYTES = 8 << 20
_MADV_HUGEPAGE = 14
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@lru_cache(maxsize=1)
def _madvise():
    """libc's madvise when huge pages must be asked for (THP mode ``madvise``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mode = _THP_MODE.read_text()
        if "[madvise]" not in mode:
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def advise_huge_pages(t: Tensor) -> bool:
    """Ask for huge pages under the 2 MiB-aligned interior of ``t``'s memory; True when advised."""
    nbytes = t.numel() * t.element_size()
    fn = _madvise() if nbytes >= MIN_ADVISE_BYTES else None
    if fn is None:
        return False
    start = -(-t.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (t.data_ptr() + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return end > start and fn(start, end - start, _MADV_HUGEPAGE) == 0


def empty_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> Tensor:
    """``torch.empty(shape, dtype=dtype)`` for a kernel to fill, on huge pages when it is large."""
    out = torch.empty(shape, dtype=dtype)
    advise_huge_pages(out)
    return out
