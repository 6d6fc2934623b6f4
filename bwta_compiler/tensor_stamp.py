"""What tells a tensor's contents changed without reading them: the one place that stamps tensors.

Compiled graphs keep values computed from parameters (packed weights, code thresholds) and must
notice when a parameter changes:

* an in-place write moves the tensor's version counter (``p.copy_``, ``load_state_dict``);
* ``p.data = t`` and ``model.to(...)`` give it another storage without moving the counter: the
  data pointer moves, or, when the allocator hands the freed block straight back, the old storage
  is gone, which a weak reference to it shows (a data pointer alone missed ``m.to(torch.float64)
  .to(torch.float32)`` whenever the float32 storage came back at its old address);
* inference tensors (made under ``torch.inference_mode()``) have no version counter at all: their
  in-place writes cannot be seen (like writes through ``p.data``), so a stamp uses the storage only
  and memos keyed on a version must not be used for them (:func:`tensor_version` returns None).
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef


def tensor_version(t: torch.Tensor) -> int | None:
    """``t._version``, or None for an inference tensor, which has no version counter."""
    return None if t.is_inference() else t._version


class TensorStamp:
    """A tensor's version, data pointer and (weakly) its storage, taken now; :meth:`matches` is
    True while the same tensor still has the same storage and no in-place write it can see."""

    __slots__ = ("ptr", "storage", "version")

    def __init__(self, t: torch.Tensor) -> None:
        self.version = tensor_version(t)
        self.ptr = t.data_ptr()
        self.storage = StorageWeakRef(t.untyped_storage())

    @property
    def tracks_writes(self) -> bool:
        """False for an inference tensor: an in-place write to it leaves the stamp matching."""
        return self.version is not None

    def matches(self, t: torch.Tensor) -> bool:
        # While the stamped storage lives no other storage can start at its address, so an equal
        # data pointer means the same storage; once it is freed, a new one there is a change.
        return self.ptr == t.data_ptr() and self.version == tensor_version(t) and not self.storage.expired()
