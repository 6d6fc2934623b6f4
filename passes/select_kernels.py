"""Pick, per fused node, the variant, the target and the kernel parameters, and record them as a
frozen ``KernelChoice`` in ``node.meta["bwta_choice"]``.  Data only: no source is rendered here;
the backend binds the chosen kernels after the pipeline."""

from __future__ import annotations

import typing

from torch.fx import GraphModule

from bwta_compiler import formats
from bwta_compiler.kernels import DType, GemmParams, KernelChoice

from .context import PassContext
from .fuse_lowbit_matmul import FusedSpec
from .patterns import bwta, is_call

KERNEL_DTYPES = frozenset(typing.get_args(DType))


def gemm_params(spec: FusedSpec, pad_bits: int) -> GemmParams:
    """The target-independent Params of a fused node (targets then pick tiles and ISA)."""
    return GemmParams(
        variant=spec.variant, a_act=spec.a_act, b_act=spec.b_act, k=spec.k,
        kw=formats.num_words(spec.k, pad_bits) if spec.k else 0, n=spec.n if spec.op == "linear" else 0,
        has_scale=spec.has_scale, scale_per_col=spec.scale_per_col, has_bias=spec.has_bias,
        in_dtype=spec.in_dtype, out_dtype=spec.out_dtype, b_kn=spec.b_kn, pad_bits=pad_bits)


def _choose(spec: FusedSpec, ctx: PassContext) -> KernelChoice:
    params = gemm_params(spec, ctx.cfg.pad_bits)
    unsupported = sorted({spec.in_dtype, spec.out_dtype, spec.b_dtype or spec.in_dtype} - KERNEL_DTYPES)
    if unsupported:
        # e.g. a model moved to float64: the fused op still computes the low-bit result (reference).
        return KernelChoice(spec.variant, "reference", params=params,
                            reason=f"no kernel for {', '.join(unsupported)} operands "
                                   f"(kernels take {', '.join(sorted(KERNEL_DTYPES))}); reference op used")
    if not ctx.cfg.codegen:
        return KernelChoice(spec.variant, "reference", params=params, reason="codegen disabled (reference op)")
    mixed = bool(spec.b_dtype) and spec.b_dtype != spec.in_dtype
    if spec.k == 0 or mixed:
        # A run-time key length (P.V of a growing KV cache, dynamic sequence lengths) or operands
        # in two dtypes (fp32 probabilities x bf16 V): the CPU has a kernel that needs only a
        # static N (the head dim) and loads each operand in its own dtype; elsewhere the reference.
        if ctx.target == "cpu" and spec.op == "qbmm" and spec.variant in ("ut", "tt") and spec.b_kn \
                and 0 < spec.n <= 1024:
            return KernelChoice(spec.variant, "cpu", template="qbmm_rows", params=params.replace(
                n=spec.n, op="qbmm_rows", b_dtype=spec.b_dtype if mixed else ""))
        reason = f"mixed operand dtypes {spec.in_dtype} x {spec.b_dtype}" if mixed else "dynamic contraction length"
        return KernelChoice(spec.variant, "reference", params=params, reason=reason)
    template = f"{spec.op}_{spec.variant}" if spec.op == "linear" else f"gemm_{spec.variant}"
    return KernelChoice(spec.variant, ctx.target, template=template, params=params)


def select_kernels(gm: GraphModule, ctx: PassContext) -> GraphModule:
    for node in gm.graph.nodes:
        if is_call(node, bwta.linear.default, bwta.qbmm.default) and "bwta" in node.meta:
            node.meta["bwta_choice"] = _choose(node.meta["bwta"], ctx)
            ctx.counters["select_kernels"] += 1
    return gm
