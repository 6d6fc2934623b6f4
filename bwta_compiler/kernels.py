"""Kernel data types: the frozen ``*Params`` every template renders from, ``KernelChoice``
(what the selector writes onto a node), and the registry of templates.

CPU and CUDA templates of one kernel take the same Params type, so the CPU build checks the
same lowering the GPU uses.  Passes never render text; codegen never looks at the graph.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Literal

Variant = Literal["bt", "tt", "ut", "bb"]
Act = Literal["ternary", "bool", "binary"]
DType = Literal["float32", "float16", "bfloat16"]
Target = Literal["cpu", "cuda"]

VARIANT_OF_ACTS: dict[tuple[str, str], str] = {
    # (A operand quantizer, B operand quantizer) -> variant.  Linear layers have binary B (weights).
    ("ternary", "binary"): "bt",
    ("bool", "binary"): "bt",       # bool = ternary with an empty N plane
    ("binary", "binary"): "bb",
    ("ternary", "ternary"): "tt",
    ("bool", "ternary"): "ut",
}


@dataclass(frozen=True)
class GemmParams:
    """One low-bit MatMul ``out[b, m, n] = epilogue(sum_k A[b, m, k] * B[b, n, k])``.

    M (tokens) is always a run-time argument; everything here is fixed at compile time.
    ``n = 0`` means N is a run-time argument too (attention, where N is the key length).
    """

    variant: Variant
    a_act: Act                    # quantizer of the A operand (activations)
    b_act: Act                    # "binary" for packed weights, else the B activation quantizer
    k: int                        # true contraction length
    kw: int                       # int32 words per packed row (K padded to pad_bits)
    n: int = 0                    # static N for linear layers, 0 = dynamic
    has_scale: bool = True        # epilogue multiplies by scale
    scale_per_col: bool = True    # scale is a [N] vector (else one scalar)
    has_bias: bool = False
    in_dtype: DType = "float32"
    out_dtype: DType = "float32"
    b_kn: bool = False            # B activations are given [K, N] (e.g. V in P·V) instead of [N, K]
    pad_bits: int = 64
    tile_m: int = 4
    tile_n: int = 4
    isa: str = "portable"         # CPU: avx512 | avx2 | portable; CUDA: sm_80 | sm_90 ...
    impl: str = "popc"            # CUDA: "mma" (binary tensor cores) | "popc" (CUDA cores)
    op: str = "linear"            # fused op the kernel serves: "linear" (bwta::linear) | "qbmm" (bwta::qbmm)
    block_n: int = 0              # CPU: B rows per cache block (a block's packed rows stay in L2); 0 = all
    b_dtype: str = ""             # dtype of a B activation when it differs from in_dtype (CPU qbmm_rows)
    warps_m: int = 1              # CUDA: warps along M (tokens) per block
    warps_n: int = 4              # CUDA: warps along N (rows / keys) per block

    def replace(self, **kw) -> GemmParams:
        return dataclasses.replace(self, **kw)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclass(frozen=True)
class KernelChoice:
    """What the selector decided for one fused node."""

    variant: str                  # bt | tt | ut | bb | float
    target: str                   # cpu | cuda | reference
    template: str = ""            # template name, "" for the reference op
    params: GemmParams | None = None
    reason: str = ""              # why (or why not low-bit)

    def describe(self) -> str:
        p = self.params
        shape = f"N={p.n or 'dyn'} K={p.k}" if p else ""
        return f"{self.variant:5s} {self.target:9s} {self.template or '-':24s} {shape} {self.reason}".rstrip()


# ---- template registry ------------------------------------------------------------------------

_TEMPLATES: dict[tuple[str, str], str] = {}


def register_template(target: str, name: str, filename: str) -> None:
    """Register a template file once; a duplicate name is a programming error."""
    key = (target, name)
    if key in _TEMPLATES:
        raise ValueError(f"template {name!r} for target {target!r} is already registered")
    _TEMPLATES[key] = filename


def template_file(target: str, name: str) -> str:
    try:
        return _TEMPLATES[(target, name)]
    except KeyError:
        raise KeyError(f"no template {name!r} for target {target!r}; known: {sorted(_TEMPLATES)}") from None


def templates() -> dict[tuple[str, str], str]:
    return dict(_TEMPLATES)
