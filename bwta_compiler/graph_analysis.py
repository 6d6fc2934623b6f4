"""Graph analysis with networkx: which fused low-bit ops feed which, through float-only ops.

A chain ``bwta op -> float ops (norm, residual, activation) -> bwta op`` is where packed
activations could flow between layers without a float round trip; the debug dump lists these
"low-bit regions" so they can be inspected (``regions.txt``).
"""

from __future__ import annotations

import networkx as nx
from torch.fx import GraphModule

from . import launch_ops  # noqa: F401  (defines the launch twins named below)
from .passes.patterns import bwta, is_call

_FUSED = (bwta.linear.default, bwta.qbmm.default, bwta.linear_launch.default, bwta.qbmm_launch.default)


def to_networkx(gm: GraphModule) -> nx.DiGraph:
    """The FX graph as a DiGraph of node names (edges: producer -> consumer)."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        g.add_node(node.name, op=node.op, target=str(node.target), fused=is_call(node, *_FUSED))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def feeds(gm: GraphModule) -> dict[str, list[str]]:
    """For every fused op, the fused ops that reach it through non-fused nodes only."""
    g = to_networkx(gm)
    fused = [n for n, d in g.nodes(data=True) if d["fused"]]
    out = {}
    for f in fused:
        # Stop the search at other fused ops: only their direct, float-only paths count.
        blocked = g.subgraph(n for n in g.nodes if n == f or not g.nodes[n]["fused"])
        sources = set()
        for pred in g.predecessors(f):
            if g.nodes[pred]["fused"]:
                sources.add(pred)
                continue
            for anc in nx.ancestors(blocked, pred) | {pred}:
                sources.update(p for p in g.predecessors(anc) if g.nodes[p]["fused"])
        out[f] = sorted(sources)
    return out


def regions(gm: GraphModule) -> list[list[str]]:
    """Groups of fused ops connected through float-only paths (weakly connected components)."""
    h = nx.Graph()
    for dst, srcs in feeds(gm).items():
        h.add_node(dst)
        h.add_edges_from((s, dst) for s in srcs)
    return sorted((sorted(c) for c in nx.connected_components(h)), key=len, reverse=True)


def describe(gm: GraphModule) -> str:
    lines = [f"{len(r)} fused ops: {' '.join(r)}" for r in regions(gm)]
    lines += [f"{dst} <- {', '.join(srcs) or '(graph inputs)'}" for dst, srcs in feeds(gm).items()]
    return "\n".join(lines) + "\n"
