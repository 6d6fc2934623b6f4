"""The low-bit coverage report: ``k of n MatMuls run in low bit``, and for each that does not,
the node and the reason.  Available from Python after a compile via :func:`last_report`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GraphReport:
    graph_id: int
    matmuls: list = field(default_factory=list)      # passes.MatmulRecord
    kernels: list = field(default_factory=list)      # (node name, KernelChoice.describe(), kernel name)
    mode: str = "inference"                          # inference | training | failed
    notes: list = field(default_factory=list)
    packed_weight_bytes: int = 0
    float_weight_bytes: int = 0
    seconds: dict = field(default_factory=dict)      # compile phase -> wall seconds (passes, kernels, fallback)

    @property
    def lowbit(self) -> int:
        return sum(m.lowbit for m in self.matmuls)

    def summary(self) -> str:
        return f"graph {self.graph_id} ({self.mode}): {self.lowbit} of {len(self.matmuls)} MatMuls run in low bit"

    def lines(self) -> list[str]:
        out = [self.summary()]
        out += [f"  float: {m.node} ({m.op}): {m.reason}" for m in self.matmuls if not m.lowbit]
        out += [f"  note: {n}" for n in self.notes]
        if self.float_weight_bytes:
            out.append(f"  weights: {self.float_weight_bytes} B float -> {self.packed_weight_bytes} B packed")
        if self.seconds:
            out.append("  compile time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items()))
        return out

    def kernel_table(self) -> str:
        rows = [f"{'node':24s} {'choice':60s} kernel"]
        rows += [f"{n:24s} {d:60s} {k or '(reference op)'}" for n, d, k in self.kernels]
        return "\n".join(rows) + "\n"


@dataclass
class Report:
    """All graphs compiled since the last :func:`reset_reports`."""

    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def lowbit(self) -> int:
        return sum(g.lowbit for g in self.graphs)

    @property
    def total(self) -> int:
        return sum(len(g.matmuls) for g in self.graphs)

    def summary(self) -> str:
        return f"{self.lowbit} of {self.total} MatMuls run in low bit ({len(self.graphs)} graph(s))"

    def lines(self) -> list[str]:
        out = [self.summary()]
        for g in self.graphs:
            out += g.lines()
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


_REPORT = Report()


def add_graph(g: GraphReport) -> None:
    _REPORT.graphs.append(g)


def last_report() -> Report:
    """The report of every graph compiled by the bwta backend since :func:`reset_reports`."""
    return _REPORT


def reset_reports() -> None:
    _REPORT.graphs.clear()
