"""Lean launch ops for bound kernels: ``bwta::linear_launch`` and ``bwta::qbmm_launch``.

Why they exist: ``torch.library.custom_op`` runs every call through Python layers (the autograd
wrapper, output-alias checks, a Dynamo-disable frame) that cost ~40 us per call on the 2-core
test machine, more than the whole 768x768 decode kernel (~37 us).  Once the backend has bound a
generated kernel to a fused node it retargets the node to the launch twin of its op: the same
schema (so fake shapes, the dump and the report read the same), defined with a plain
``torch.library.Library`` whose implementation calls the kernel directly (~3 us of dispatch).  The
kernel's own wrapper checks dtypes and shapes; the quantizer scales are checked here once per
scale tensor and write (see tensor_stamp.py), as ``bwta::linear`` / ``bwta::qbmm`` check them on
every call.

Inference graphs only: the launch ops have no autograd formula (the backend never binds kernels
into graphs that need gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernel_registry, reference
from .ops import LIB, check_scalar_scale
from .tensor_stamp import StampedMemo

_lib = torch.library.Library(LIB, "FRAGMENT")
_MAX_SEEN = 4096


def _define_twin(op: torch._ops.OpOverload, name: str) -> None:
    """Define ``bwta::<name>`` with ``op``'s schema (the one definition of the arguments)."""
    schema = str(op._schema)
    _lib.define(name + schema[schema.index("("):])


_define_twin(torch.ops.bwta.linear.default, "linear_launch")
_define_twin(torch.ops.bwta.qbmm.default, "qbmm_launch")


class _CheckedScales:
    """Quantizer scales already validated (a graph's scales are constants: each is checked on its
    first call, and again only after it is written to or given new storage; inference tensors,
    which cannot show a write, on every call: see StampedMemo)."""

    def __init__(self) -> None:
        self._seen = StampedMemo(_MAX_SEEN)

    def check(self, op: str, s: Tensor, b: Tensor | None) -> None:
        for name, t, positive in (("s", s, True), ("b", b, False)):
            if t is None or self._seen.get((positive,), (t,)) is not StampedMemo.MISS:
                continue
            check_scalar_scale(name, t, op, positive=positive)
            self._seen.put((positive,), (t,), True)


_SCALES = _CheckedScales()


def _linear_launch(x: Tensor, s: Tensor, b: Tensor | None, act: str, w_packed: Tensor, k: int,
                   scale: Tensor | None = None, bias: Tensor | None = None, out_dtype: torch.dtype | None = None,
                   pad_bits: int = 64, kernel_id: str = "") -> Tensor:
    _SCALES.check("linear", s, b)
    return kernel_registry.get(kernel_id)(x, s, b, w_packed, scale, bias, out_dtype)


def _qbmm_launch(a: Tensor, a_act: str, a_s: Tensor, a_b: Tensor | None, b: Tensor, b_act: str, b_s: Tensor,
                 b_b: Tensor | None, b_kn: bool, scale: Tensor | None = None, bias: Tensor | None = None,
                 out_dtype: torch.dtype | None = None, pad_bits: int = 64, kernel_id: str = "") -> Tensor:
    _SCALES.check("qbmm", a_s, a_b)
    _SCALES.check("qbmm", b_s, b_b)
    return kernel_registry.get(kernel_id)(a, a_s, a_b, b, b_s, b_b, scale, bias, out_dtype)


# CompositeExplicitAutograd: one implementation for every device (the bound kernel is the
# target's own), and no autograd wrapper in front of it.
_lib.impl("linear_launch", _linear_launch, "CompositeExplicitAutograd")
_lib.impl("qbmm_launch", _qbmm_launch, "CompositeExplicitAutograd")
torch.library.register_fake(f"{LIB}::linear_launch", reference.linear_fake, lib=_lib)
torch.library.register_fake(f"{LIB}::qbmm_launch", reference.qbmm_fake, lib=_lib)

# The launch twin of each fused op (the backend retargets a node once its kernel is bound).
LAUNCH: dict[torch._ops.OpOverload, torch._ops.OpOverload] = {
    torch.ops.bwta.linear.default: torch.ops.bwta.linear_launch.default,
    torch.ops.bwta.qbmm.default: torch.ops.bwta.qbmm_launch.default,
}
