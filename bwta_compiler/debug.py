"""The debug dump: ``BWTA_DEBUG_DIR=dir`` (or ``options={"debug_dir": dir}``) writes, per compiled
graph, numbered readable graphs (the input and after each pass), the kernel-choice table, the
low-bit report, and every generated kernel's source, cache key and compile log."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from torch.fx import GraphModule

log = logging.getLogger("bwta_compiler.debug")
_graph_ids = itertools.count()
# Per dump root: the first directory number this process uses (after the graphs already there,
# so a second run into the same directory adds to it instead of overwriting graph_000, ...).
_offsets: dict[Path, int] = {}


def next_graph_id() -> int:
    return next(_graph_ids)


def _offset(root: Path) -> int:
    if root not in _offsets:
        taken = [int(p.name[6:]) for p in root.glob("graph_*") if p.name[6:].isdigit()] if root.is_dir() else []
        _offsets[root] = max(taken, default=-1) + 1
    return _offsets[root]


class DebugDump:
    """Writes into ``<root>/graph_<n>/`` (n = the graph id, after the graphs a previous process left
    in ``root``); every method is a no-op when ``root`` is empty."""

    def __init__(self, root: str, graph_id: int) -> None:
        base = Path(root).resolve() if root else None
        self.dir: Path | None = base / f"graph_{graph_id + _offset(base):03d}" if base else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            log.info("bwta debug dump for graph %d: %s", graph_id, self.dir)

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def graph(self, index: int, name: str, gm: GraphModule) -> None:
        if self.dir is not None:
            text = gm.print_readable(print_output=False, include_stride=False, include_device=True)
            (self.dir / f"{index:02d}_{name}.py").write_text(text)

    def text(self, filename: str, content: str) -> None:
        if self.dir is not None:
            (self.dir / filename).write_text(content)

    def kernel(self, name: str, source: str, suffix: str, key_lines: Iterable[str], log_text: str,
               params_json: str) -> Path | None:
        if self.dir is None:
            return None
        kdir = self.dir / "kernels"
        kdir.mkdir(exist_ok=True)
        src = kdir / f"{name}{suffix}"
        src.write_text(source)
        (kdir / f"{name}.key.txt").write_text("\n".join(key_lines) + "\n")
        (kdir / f"{name}.log").write_text(log_text or "(empty compiler log)\n")
        (kdir / f"{name}.params.json").write_text(json.dumps(json.loads(params_json), indent=2) + "\n")
        return src
