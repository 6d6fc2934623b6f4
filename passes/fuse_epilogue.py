"""Absorb the epilogue into fused low-bit ops: ``mul(acc, scale)`` (a scalar or a per-column [N]
vector), then ``add(., bias[N])``, then a dtype cast.  View ops between the MatMul and the
epilogue are element-order preserving, so they are moved after the fused op.

The fused op computes ``float(acc) * scale + bias`` in fp32 and casts once, exactly the
arithmetic of the ops it replaces.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .context import PassContext
from .patterns import RESHAPE_OPS, aten, bwta, is_call, meta_val


def _only_user(node: Node) -> Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _other(node: Node, this: Node):
    a, b = node.args[:2]
    return b if a is this else a


def _fits(t: torch.Tensor | None, n: int, allow_scalar: bool) -> bool:
    if t is None or not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        return False
    if allow_scalar and t.numel() == 1 and t.dim() <= 1:
        return True
    return t.dim() == 1 and isinstance(t.shape[0], int) and t.shape[0] == n and n > 0


def _absorb(gm: GraphModule, fused: Node, ctx: PassContext) -> bool:
    spec = fused.meta["bwta"]
    views: list[Node] = []
    cur = fused
    nxt = _only_user(cur)
    while nxt is not None and is_call(nxt, *RESHAPE_OPS) and nxt.args[0] is cur:
        views.append(nxt)
        cur, nxt = nxt, _only_user(nxt)
    last_view_val = meta_val(cur)
    n = last_view_val.shape[-1] if last_view_val is not None else 0
    if nxt is None or not is_call(nxt, aten.mul.Tensor) or fused.kwargs.get("scale") is not None:
        return False
    scale = _other(nxt, cur)
    if not isinstance(scale, Node) or not _fits(meta_val(scale), n, allow_scalar=True):
        return False
    end, bias, out_dtype = nxt, None, meta_val(nxt).dtype
    add = _only_user(nxt)
    if add is not None and is_call(add, aten.add.Tensor) and not add.kwargs.get("alpha"):
        cand = _other(add, nxt)
        if isinstance(cand, Node) and _fits(meta_val(cand), n, allow_scalar=False):
            end, bias, out_dtype = add, cand, meta_val(add).dtype
    if out_dtype != torch.float32:
        return False  # the fp32 epilogue would not be the arithmetic the graph did
    cast = _only_user(end)
    if cast is not None and is_call(cast, aten._to_copy.default) and set(cast.kwargs) == {"dtype"}:
        end, out_dtype = cast, cast.kwargs["dtype"]
    elif cast is not None and is_call(cast, torch.ops.prims.convert_element_type.default) and len(cast.args) == 2:
        end, out_dtype = cast, cast.args[1]
    kwargs = dict(fused.kwargs, scale=scale, bias=bias, out_dtype=out_dtype)
    with gm.graph.inserting_before(end.next):
        new = gm.graph.call_function(fused.target, fused.args, kwargs)
        out = new
        for v in views:
            out = gm.graph.call_function(v.target, (out, *v.args[1:]), dict(v.kwargs))
            out.meta["val"] = meta_val(v).to(out_dtype)
    new.meta["val"] = meta_val(fused).to(out_dtype)
    new.meta["bwta"] = spec.replace(has_scale=True, scale_per_col=meta_val(scale).numel() > 1,
                                    has_bias=bias is not None, out_dtype=str(out_dtype).replace("torch.", ""))
    end.replace_all_uses_with(out)
    return True


def fuse_epilogue(gm: GraphModule, ctx: PassContext) -> GraphModule:
    for node in list(gm.graph.nodes):
        if is_call(node, bwta.linear.default, bwta.qbmm.default) and "bwta" in node.meta:
            if _absorb(gm, node, ctx):
                ctx.counters["fuse_epilogue"] += 1
    gm.graph.eliminate_dead_code()
    return gm
