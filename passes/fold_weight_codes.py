"""Fold weight quantize + pack at compile time.

``bwta::binary_code(W)`` of a frozen parameter becomes two constants on the module, the packed
binary words ``[N, Kw]`` (int32) and the per-channel scale ``alpha``; uses of the codes read them
through ``bwta::unpack_binary`` (which the fusion pass then swallows).  At run time
``weight_binding.WeightBinder`` passes the packed set of the parameters actually called with.
"""

from __future__ import annotations

import operator
import weakref

import torch
from torch.fx import GraphModule

from bwta_compiler import formats, ops
from bwta_compiler.tensor_stamp import TensorStamp

from .context import FoldedWeight, PassContext
from .patterns import bwta, is_call

# Packed weights by parameter: a model compiles to several graphs (prefill, decode step, a graph
# break, a new dynamic shape) that fold the same parameters; packing a LLaMA-7B layer's 400M
# weights takes seconds, so each (tensor, version, storage, pad_bits) is packed once.  Keyed by identity
# (tensors compare elementwise, so no WeakKeyDictionary); the entry goes when the tensor does.
_PACKED: dict[int, tuple] = {}


def _forget(ref: weakref.ref, ident: int) -> None:
    if ident in _PACKED and _PACKED[ident][0] is ref:
        del _PACKED[ident]


def pack_weight(w: torch.Tensor, pad_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed words [N, Kw] int32, alpha [N] fp32) of a float weight [N, K]."""
    key = (pad_bits, w.dtype, tuple(w.shape))
    hit = _PACKED.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == key and hit[4].matches(w):
        # Copies: each graph owns its constants (the run-time repack writes into them in place).
        return hit[2].clone(), hit[3].clone()
    with torch.no_grad():
        codes, alpha = ops.binary_code_eager(w.detach())
        packed, alpha = formats.pack_binary_codes(codes, pad_bits).contiguous(), alpha.contiguous()
    ident = id(w)
    _PACKED[ident] = (weakref.ref(w, lambda r, i=ident: _forget(r, i)), key, packed, alpha, TensorStamp(w))
    return packed.clone(), alpha.clone()


def _own_packed_input(gm: GraphModule, node, ctx: PassContext) -> None:
    """``unpack_binary(buffer input)`` of a frozen model: read a private copy as a constant."""
    src = node.args[0]
    t = ctx.param(src)
    if src.op != "placeholder" or t is None:
        return
    attr = f"_bwta_p{ctx.counters['fold_weight_codes']}_packed"
    gm.register_buffer(attr, t.detach().clone().contiguous())
    with gm.graph.inserting_before(node):
        const = gm.graph.get_attr(attr)
    const.meta["val"] = src.meta.get("val")
    node.replace_input_with(src, const)
    if src.target in ctx.input_index:
        ctx.folded.append(FoldedWeight(ctx.input_index[src.target], attr))
    ctx.counters["fold_weight_codes"] += 1


def fold_weight_codes(gm: GraphModule, ctx: PassContext) -> GraphModule:
    for node in list(gm.graph.nodes):
        if is_call(node, bwta.unpack_binary.default):
            _own_packed_input(gm, node, ctx)
            continue
        if not is_call(node, bwta.binary_code.default):
            continue
        w_node = node.args[0]
        w = ctx.param(w_node)
        if w is None or w.dim() != 2:
            continue
        packed, alpha = pack_weight(w, ctx.cfg.pad_bits)
        idx = ctx.counters["fold_weight_codes"]
        p_attr, a_attr = f"_bwta_w{idx}_packed", f"_bwta_w{idx}_alpha"
        gm.register_buffer(p_attr, packed)
        gm.register_buffer(a_attr, alpha)
        with gm.graph.inserting_before(node):
            p_node = gm.graph.get_attr(p_attr)
            a_node = gm.graph.get_attr(a_attr)
            codes = gm.graph.call_function(bwta.unpack_binary.default, (p_node, w.shape[1], w.dtype))
        codes.meta["val"] = node.meta["val"][0] if "val" in node.meta else None
        a_node.meta["val"] = node.meta["val"][1] if "val" in node.meta else None
        for user in list(node.users):
            if is_call(user, operator.getitem):
                user.replace_all_uses_with(codes if user.args[1] == 0 else a_node)
                gm.graph.erase_node(user)
        if not node.users:
            gm.graph.erase_node(node)
        if w_node.op == "placeholder" and w_node.target in ctx.input_index:
            ctx.folded.append(FoldedWeight(ctx.input_index[w_node.target], p_attr, a_attr))
        ctx.counters["fold_weight_codes"] += 1
    return gm
