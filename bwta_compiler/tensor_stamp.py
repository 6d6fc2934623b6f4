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

import weakref

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


_MISS = object()


class StampedMemo:
    """Values computed from a few tensors (quantizer scales), reused while those same tensors show
    no change (:class:`TensorStamp`); inference tensors, whose writes cannot be seen, are never
    memoised.  Bounded: cleared when ``limit`` entries are reached.  Tensors are held weakly, so a
    new tensor that reuses a dead one's id is a miss."""

    MISS = _MISS

    def __init__(self, limit: int) -> None:
        self._entries: dict[tuple, tuple] = {}
        self._limit = limit

    def get(self, key: tuple, tensors: tuple[torch.Tensor | None, ...]) -> object:
        """The value stored for ``key`` and these tensors, or :attr:`MISS`."""
        hit = self._entries.get((*key, *map(id, tensors)))
        if hit is None:
            return _MISS
        refs, stamps, value = hit
        for ref, stamp, t in zip(refs, stamps, tensors):
            if t is not None and (ref() is not t or not stamp.matches(t)):
                return _MISS
        return value

    def put(self, key: tuple, tensors: tuple[torch.Tensor | None, ...], value: object) -> None:
        stamps = tuple(None if t is None else TensorStamp(t) for t in tensors)
        if any(s is not None and not s.tracks_writes for s in stamps):
            return
        if len(self._entries) >= self._limit:
            self._entries.clear()
        refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self._entries[(*key, *map(id, tensors))] = (refs, stamps, value)
