"""State the pass runner threads through the pipeline: config, counters, the low-bit report,
and the compile-time constants (packed weights) the passes create."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from bwta_compiler.config import Config


@dataclass
class MatmulRecord:
    """One MatMul of the input graph: did it become a low-bit op, and if not, why."""

    node: str
    op: str
    lowbit: bool = False
    variant: str = "float"
    reason: str = ""


@dataclass(frozen=True)
class FoldedWeight:
    """A weight whose binary codes were packed at compile time (at run time the packed set is
    bound to the parameter actually passed: see ``bwta_compiler.weight_binding``)."""

    input_index: int
    packed_attr: str
    alpha_attr: str = ""          # "" when the input is already packed (a frozen model's buffer)


@dataclass
class PassContext:
    cfg: Config
    # Real tensors behind graph placeholders that are frozen parameters, by placeholder name.
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    # Placeholder name -> position among the graph inputs.
    input_index: dict[str, int] = field(default_factory=dict)
    counters: Counter = field(default_factory=Counter)
    matmuls: dict[str, MatmulRecord] = field(default_factory=dict)
    folded: list[FoldedWeight] = field(default_factory=list)
    target: str = "cpu"
    passes_run: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def record(self, node_name: str, **kw: Any) -> None:
        rec = self.matmuls.get(node_name)
        if rec is None:
            return
        for k, v in kw.items():
            setattr(rec, k, v)

    def param(self, node: torch.fx.Node) -> torch.Tensor | None:
        if node.op == "placeholder":
            return self.params.get(node.target)
        if node.op == "get_attr":
            return getattr(node.graph.owning_module, node.target, None)
        return None
