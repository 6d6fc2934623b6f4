"""IR invariants checked between passes (when ``config.verify`` is on); an error names the pass."""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from bwta_compiler.errors import PassError

from .patterns import bwta, is_call


def verify(gm: GraphModule, after_pass: str, selected: bool) -> None:
    gm.graph.lint()
    for node in gm.graph.nodes:
        if is_call(node, bwta.linear.default, bwta.qbmm.default):
            if "bwta" not in node.meta:
                raise PassError(f"after pass {after_pass}: fused node {node.name} has no FusedSpec in meta['bwta']")
            if selected and "bwta_choice" not in node.meta:
                raise PassError(f"after pass {after_pass}: fused node {node.name} has no KernelChoice")
        if node.op == "get_attr" and node.target.endswith("_packed"):
            t = getattr(gm, node.target)
            if t.dtype != torch.int32:
                raise PassError(f"after pass {after_pass}: packed constant {node.target} is {t.dtype}, not int32")
